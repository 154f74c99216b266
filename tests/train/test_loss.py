import torch
import torch.nn.functional as F

from fedlora.train.loss import answer_loss_sum


def _reference(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def test_answer_only_head_equals_full_logits_loss(tiny_llama):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, 7:] = -100  # padding
    labels[2, :6] = -100
    with torch.no_grad():
        got, n = answer_loss_sum(tiny_llama, ids, mask, labels)
        want = _reference(tiny_llama, ids, mask, labels)
    assert n == int((labels[:, 1:] != -100).sum()) == 6 + 3 + 4
    assert abs(float(got) - float(want)) < 1e-10 * float(want)


class _FullLogitsOnly(torch.nn.Module):
    """A model whose forward ignores logits_to_keep, as older causal LMs do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, logits_to_keep=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_fallback_for_models_without_boolean_logits_to_keep(tiny_llama):
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, na = answer_loss_sum(tiny_llama, ids, mask, labels)
        b, nb = answer_loss_sum(_FullLogitsOnly(tiny_llama), ids, mask, labels)
    assert na == nb == 10 and abs(float(a) - float(b)) < 1e-10 * float(a)
