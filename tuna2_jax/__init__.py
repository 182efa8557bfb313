"""Tuna-2 in JAX: one decoder for text, image understanding and image generation."""
