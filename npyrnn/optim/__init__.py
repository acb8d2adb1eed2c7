"""Gradient clipping, optimisers and learning-rate schedules, written by hand.

The optimisers follow `torch.optim`'s names, defaults and update rules
(its single-tensor algorithm, `foreach=False`), the schedules
`torch.optim.lr_scheduler`'s values per epoch:

| name | file | equations |
|---|---|---|
| `clip_grad_norm` | `clip.py` | (6.1)-(6.2) |
| `clip_and_step` | `clip.py` | (6.1)-(6.3) |
| `SGD` | `sgd.py` | (6.3), (11.1)-(11.4) |
| `Adagrad` | `adagrad.py` | (11.5)-(11.7) |
| `RMSprop` | `rmsprop.py` | (11.8)-(11.11) |
| `Adam`, `AdamW` | `adam.py` | (11.12)-(11.17) |
| `StepLR`, `MultiStepLR`, `ExponentialLR`, `CosineAnnealingLR`, `LinearLR` | `schedules.py` | (11.18)-(11.22) |

```python
from npyrnn.optim import Adam, CosineAnnealingLR
opt = Adam(model.params, lr=3e-3)
sched = CosineAnnealingLR(opt, T_max=epochs)
...; opt.step(model.grads); ...; sched.step()
```
"""

from npyrnn.optim.adagrad import Adagrad
from npyrnn.optim.adam import Adam, AdamW
from npyrnn.optim.base import Optimizer, join_state_dict, split_state_dict
from npyrnn.optim.clip import clip_and_step, clip_grad_norm
from npyrnn.optim.rmsprop import RMSprop
from npyrnn.optim.schedules import CosineAnnealingLR, ExponentialLR, LinearLR, LRScheduler, MultiStepLR, StepLR
from npyrnn.optim.sgd import SGD

__all__ = [
    "clip_grad_norm",
    "clip_and_step",
    "Optimizer",
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "split_state_dict",
    "join_state_dict",
    "LRScheduler",
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "LinearLR",
]
