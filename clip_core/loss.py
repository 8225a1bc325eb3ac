"""CLIP's symmetric contrastive loss (InfoNCE over an N x N image-text similarity matrix), with the
feature all-gather that lets every rank of a data-parallel job see negatives from the global batch."""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the sum, over all ranks, of the gradient
    flowing into its own slice (reduce-scatter semantics). Every rank's loss uses every rank's features,
    so a rank's features receive gradient from all the ranks' losses, not only its own."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        ctx.world_size = dist.get_world_size()
        ctx.rank = dist.get_rank()
        gathered = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, tensor)
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad_slices = list(grad_output.contiguous().chunk(ctx.world_size, dim=0))
        grad_input = torch.empty_like(grad_slices[ctx.rank])
        dist.reduce_scatter(grad_input, grad_slices, op=dist.ReduceOp.SUM)
        return grad_input


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's features in rank order. All ranks must pass the same local batch size."""
    if gather_with_grad:
        return _AllGatherWithGrad.apply(image_features), _AllGatherWithGrad.apply(text_features)

    gathered_image = [torch.zeros_like(image_features) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text_features) for _ in range(world_size)]
    with torch.no_grad():
        dist.all_gather(gathered_image, image_features.contiguous())
        dist.all_gather(gathered_text, text_features.contiguous())
    if not local_loss:
        # The gathered copies carry no gradient; put our own features back in our slot so that the
        # global logits still back-propagate into this rank's encoders.
        gathered_image[rank] = image_features
        gathered_text[rank] = text_features
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)


class ClipLoss(nn.Module):
    """Mean of the image->text and text->image cross-entropies over cosine-similarity logits.

    `logit_scale` is the temperature already exponentiated (the model stores log(1/0.07) and the
    trainer or model clamps the exponentiated value at 100); pass it as a scalar tensor so it learns.

    Distributed modes (world_size > 1, torch.distributed initialised):
    - gather_with_grad=True: features gathered with an autograd-aware all-gather. With local_loss=False
      every rank computes the full global loss; with local_loss=True each rank scores only its own rows
      against all columns. Either way, after DDP averages gradients they equal single-process training
      on the concatenated batch (with local_loss the global loss is the mean of the ranks' losses).
    - gather_with_grad=False: gathered features are constants. With local_loss=False only this rank's
      slot carries gradient, so after DDP averaging the encoder gradients are 1/world_size of the
      single-process ones (the logit_scale gradient is exact); local_loss=True also drops the
      cross-rank gradient terms. The loss values are the same as with gradients.
    """

    def __init__(
        self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self._labels: dict[tuple[torch.device, int], torch.Tensor] = {}

    def ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        """Index of the matching pair for each row; offset by rank when rows are this rank's slice."""
        key = (device, num_logits)
        if key not in self._labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            self._labels[key] = labels
        return self._labels[key]

    def logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size == 1:
            logits_per_image = logit_scale * image_features @ text_features.T
            return logits_per_image, logits_per_image.T

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"ClipLoss was built with world_size={self.world_size} but torch.distributed is not "
                "initialised; call torch.distributed.init_process_group first or use world_size=1."
            )
        all_image_features, all_text_features = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text_features.T
            logits_per_text = logit_scale * text_features @ all_image_features.T
            return logits_per_image, logits_per_text
        logits_per_image = logit_scale * all_image_features @ all_text_features.T
        return logits_per_image, logits_per_image.T

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        labels = self.ground_truth(image_features.device, logits_per_image.shape[0])
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss
