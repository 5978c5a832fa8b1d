"""Family-independent building blocks: transformer layers, the SparseDiT blocks and layout, the pruning schedule,
checkpoint I/O and the helpers shared by every family's converters."""
