"""The teacher: a pretrained text encoder with LoRA adapters, one tower for items and users."""
