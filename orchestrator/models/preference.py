"""Direct Preference Optimization (Rafailov et al. 2023) as a module: the policy being trained
and a frozen copy of its starting point (the reference) in one `nn.Module` whose forward returns
the DPO loss, so every strategy trains it like any other model.

loss = -log σ(β · [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

with the log-probabilities summed over the response tokens only (labels != -100). At the first
step the policy equals the reference, so the loss is exactly log 2. Both copies have their
transformer blocks, so FSDP shards the reference like the policy; the reference has no
gradients or optimizer state. Only the policy is saved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.models.specs import POLICY

IGNORE = -100


@dataclass
class PreferenceOutput:
    loss: torch.Tensor
    reward_accuracy: torch.Tensor  # share of pairs whose chosen answer gains more than rejected
    reward_margin: torch.Tensor  # mean β·(chosen - rejected) implicit reward

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Logged beside the loss every step (the strategies average them over micro batches
        and ranks)."""
        return {"reward_accuracy": self.reward_accuracy, "reward_margin": self.reward_margin}


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(label_t+1 | ..t), skipping IGNORE labels."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    scored = labels != IGNORE
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1))
    return (picked.squeeze(-1) * scored).sum(-1)


class PreferenceModel(nn.Module):
    def __init__(self, policy: nn.Module, beta: float) -> None:
        super().__init__()
        self.policy = policy
        self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
        self.beta = beta
        self.config = policy.config  # the blocks' count and the vocabulary, for the strategies

    def train(self, mode: bool = True) -> PreferenceModel:
        super().train(mode)
        self.reference.eval()  # no dropout in the reference, ever
        return self

    def get_output_embeddings(self) -> None:
        """None for the planner: the last forward of a step is the reference's, without
        gradients, so no output projection stays gathered into backward (measured under
        DeepSpeed ZeRO-3, which otherwise keeps the head)."""
        return None

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.policy.gradient_checkpointing_enable(**kwargs)

    def forward(self, chosen_input_ids: torch.Tensor, chosen_labels: torch.Tensor,
                rejected_input_ids: torch.Tensor, rejected_labels: torch.Tensor
                ) -> PreferenceOutput:
        ids = torch.cat([chosen_input_ids, rejected_input_ids])
        labels = torch.cat([chosen_labels, rejected_labels])
        policy = sequence_logprobs(self.policy(input_ids=ids).logits, labels)
        with torch.no_grad():
            reference = sequence_logprobs(self.reference(input_ids=ids).logits, labels)
        n = chosen_input_ids.shape[0]
        gain = policy - reference
        margin = self.beta * (gain[:n] - gain[n:])
        return PreferenceOutput(loss=-nn.functional.logsigmoid(margin).mean(),
                                reward_accuracy=(margin > 0).float().mean().detach(),
                                reward_margin=margin.mean().detach())


def policy_only(model: nn.Module, state: dict[str, torch.Tensor]
                ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """For saving: the policy and its weights out of a full state dict (unchanged otherwise)."""
    if not isinstance(model, PreferenceModel):
        return model, state
    return model.policy, {k[len(POLICY):]: v for k, v in state.items() if k.startswith(POLICY)}
