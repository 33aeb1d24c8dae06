"""Cut machinery: capture a forward as a graph, infer every value's axis roles, cut after values, find the default
cut; attention taps and the timm ViT / Swin routes. Imports ``funcam._src.base`` and ``guard`` only."""
