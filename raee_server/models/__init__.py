"""Backbones (causal, masked, seq2seq families), their loading, and key encoders."""
