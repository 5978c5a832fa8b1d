"""Sample-quality metrics: ADM-suite FID / sFID / IS / precision / recall, the Inception network and the digits metric."""
