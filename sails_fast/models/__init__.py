"""Language models: the embedded default model (`embedded`), loading a config's model path (`loading`: local
folder, .gguf, hub id, the 4-bit training base) and the plumbing forward hooks need (`hooks`).

May import: sails_fast.integrations, sails_fast.fused, sails_fast.core.
"""
