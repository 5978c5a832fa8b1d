"""Measuring models: MACs, throughput, attention analysis, sample quality (FID and friends) and the demo report."""
