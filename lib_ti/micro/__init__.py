"""The micro Stable Diffusion: a tiny SD1-architecture model pretrained by the project on a synthetic
"shapes world", so embedding quality can be measured on a CPU (see ``pretrain``, ``quality``)."""
