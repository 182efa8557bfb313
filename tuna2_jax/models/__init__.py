"""Tuna-2 networks: patch embedding, vision encoder, decoder, flow head and the unified model."""
