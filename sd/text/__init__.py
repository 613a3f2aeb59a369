"""Prompt text to token ids and weights: the CLIP tokenizer, prompt weighting, the text encode."""
