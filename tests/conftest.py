import torch

# Two cores shared with other processes: intra-op threads fight each other and a step gets ~10x
# slower. One thread keeps the suite's time stable.
torch.set_num_threads(1)
