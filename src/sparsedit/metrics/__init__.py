"""Sample-quality metrics: ADM-compatible ImageNet metrics and the embedded digits score."""
