"""Patches for real model code (Hugging Face, open_flamingo, ...) that route their hot spots
through mmfast.nn."""
