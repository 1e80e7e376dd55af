"""LoRA adapter files: where they are kept, what they are for, and their hashes."""
