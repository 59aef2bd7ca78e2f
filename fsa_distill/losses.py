"""Training losses shared by the pretraining and fine-tuning stages."""

from __future__ import annotations

from typing import Any


def token_mean_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Cross-entropy summed over the label tokens (-100 ignored) and divided by `num_items_in_batch`.

    The Trainer's `compute_loss_func` (in-process too). The Trainer counts the label tokens of a whole
    optimizer step (every accumulation micro-batch, every rank) and, trusting the model to divide by
    that count, neither divides the loss by the accumulation steps nor undoes its multiplication by
    the ranks (for DDP's gradient mean); T5 ignores the count and averages over its own micro-batch,
    so its loss and gradient came out x accumulation steps x ranks (transformers 5.24). With this loss,
    a step's gradient and logged loss are the token mean over the global batch however it is split;
    one process without accumulation computes what T5 computed. Without a count: the local mean.
    """
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                            reduction="sum")  # fmt: skip
    count = num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum()
    if hasattr(count, "to"):
        count = count.to(total.device)
    return total / count
