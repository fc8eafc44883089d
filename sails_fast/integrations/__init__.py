"""Integrations with other libraries (PEFT, bitsandbytes, SAELens). Each module imports its library lazily."""
