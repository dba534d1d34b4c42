"""Suite-wide settings.

The suite runs as two pytest-xdist workers on a 2-core machine: one thread per worker avoids
oversubscription, which on such a machine slows small ops by an order of magnitude.
"""

import torch

torch.set_num_threads(1)
