"""Integrations with other libraries, each imported lazily: `peft` (fuse_lora / unfuse_lora: route PEFT's
LoRA layers through the fused ops), `peft_layers` (reading a PEFT LoRA layer's adapter tensors), `bnb`
(PEFT's bitsandbytes Linear4bit layers through the fused QLoRA op).

May import: sails_fast.fused, sails_fast.kernels, sails_fast.core.
"""
