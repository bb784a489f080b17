"""The objectives of issue 4 against naive per-pair loops (float64), value and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from lipkit.errors import UserError
from lipkit.models.lexicon_head import LexiconHead, nonzero_terms
from lipkit.objectives import OBJECTIVES, build_objective
from lipkit.objectives.alip import ALIPLoss, alip_weights, weighted_clip_loss
from lipkit.objectives.filip import FILIPLoss, filip_similarity
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.intra_modal import TripleContrast
from lipkit.objectives.lexlip import LexiconContrast, flops_loss
from lipkit.objectives.multi_positive import MultiPositiveInfoNCE
from lipkit.objectives.sigmoid import INIT_LOG_LOGIT_SCALE, INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, SigmoidLoss
from objective_inputs import declared_inputs, every_input, objective_inputs, size_heads

F64 = torch.float64
TOL = 1e-10  # the float64 agreement every comparison below reaches (the brief asks for 1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread avoids spinning against other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).requires_grad_()


def log_scale(value: float = 2.0) -> torch.Tensor:
    return torch.tensor(value, dtype=F64, requires_grad=True)


def assert_same_value_and_grads(
    fast: torch.Tensor, slow: torch.Tensor, inputs: tuple[torch.Tensor, ...]
) -> None:
    assert torch.allclose(fast, slow, atol=TOL, rtol=0), (fast.item(), slow.item())
    g_fast = torch.autograd.grad(fast, inputs)
    g_slow = torch.autograd.grad(slow, inputs)
    for a, b in zip(g_fast, g_slow, strict=True):
        assert torch.allclose(a, b, atol=TOL, rtol=0), (a - b).abs().max().item()


def naive_infonce(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = torch.stack([scale * torch.dot(img[i], txt[j]) for j in range(n)])
        col = torch.stack([scale * torch.dot(img[j], txt[i]) for j in range(n)])
        total = total - (row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
    return 0.5 * total / n


# --- SigLIP -----------------------------------------------------------------------------------------


def naive_sigmoid(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale * torch.dot(img[i], txt[j]) + bias))
    return total / n


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 4])
def test_sigmoid_matches_naive_loop(chunk_size):
    img, txt = unit(7, 5, seed=1), unit(7, 5, seed=2)
    t, b = log_scale(), torch.tensor(-3.0, dtype=F64, requires_grad=True)
    fast = SigmoidLoss(chunk_size)(image_features=img, text_features=txt, logit_scale=t.exp(), logit_bias=b)
    slow = naive_sigmoid(img, txt, t.exp(), b)
    assert_same_value_and_grads(fast, slow, (img, txt, t, b))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 10, 32])
def test_sigmoid_chunked_equals_unchunked(chunk_size):
    img, txt = unit(10, 6, seed=3), unit(10, 6, seed=4)
    t = log_scale(INIT_LOG_LOGIT_SCALE)
    b = torch.tensor(INIT_LOGIT_BIAS, dtype=F64, requires_grad=True)
    whole = SigmoidLoss()(image_features=img, text_features=txt, logit_scale=t.exp(), logit_bias=b)
    chunked = SigmoidLoss(chunk_size)(
        image_features=img, text_features=txt, logit_scale=t.exp(), logit_bias=b
    )
    assert_same_value_and_grads(chunked, whole, (img, txt, t, b))


def test_sigmoid_gradcheck_chunked_and_whole():
    img, txt = unit(5, 3, seed=5), unit(5, 3, seed=6)
    t, b = log_scale(1.0), torch.tensor(-1.0, dtype=F64, requires_grad=True)
    for chunk in (None, 2):
        loss = SigmoidLoss(chunk)
        assert torch.autograd.gradcheck(lambda x, y, s, c, f=loss: f(x, y, s.exp(), c), (img, txt, t, b))


def test_sigmoid_chunked_graph_never_holds_the_logit_matrix():
    n = 48
    img, txt = unit(n, 4, seed=7), unit(n, 4, seed=8)
    t, b = log_scale(), torch.tensor(-10.0, dtype=F64, requires_grad=True)

    def largest_saved(loss_fn: SigmoidLoss) -> int:
        sizes = [0]

        def pack(x: torch.Tensor) -> torch.Tensor:
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss_fn(image_features=img, text_features=txt, logit_scale=t.exp(), logit_bias=b)
        return max(sizes)

    assert largest_saved(SigmoidLoss()) >= n * n  # the hook sees the matrix when it is kept
    assert largest_saved(SigmoidLoss(chunk_size=8)) < n * n


def test_sigmoid_init_constants():
    assert math.isclose(math.exp(INIT_LOG_LOGIT_SCALE), INIT_LOGIT_SCALE) and INIT_LOGIT_SCALE == 10.0
    assert INIT_LOGIT_BIAS == -10.0


# --- FILIP ------------------------------------------------------------------------------------------


def filip_inputs(b_img: int, b_txt: int, n: int, length: int, d: int, seed: int):
    img = unit(b_img, n, d, seed=seed)
    txt = unit(b_txt, length, d, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    lengths = torch.randint(1, length + 1, (b_txt,), generator=g)
    lengths[0] = length  # one caption without padding
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return img, txt, mask


def naive_filip_scores(img, txt, mask):
    s_img = [[None] * txt.shape[0] for _ in range(img.shape[0])]
    s_txt = [[None] * txt.shape[0] for _ in range(img.shape[0])]
    for i in range(img.shape[0]):
        for j in range(txt.shape[0]):
            words = [r for r in range(txt.shape[1]) if mask[j, r]]
            dots = [[torch.dot(img[i, k], txt[j, r]) for r in words] for k in range(img.shape[1])]
            s_img[i][j] = torch.stack([torch.stack(row).max() for row in dots]).mean()
            s_txt[i][j] = torch.stack(
                [torch.stack([row[c] for row in dots]).max() for c in range(len(words))]
            ).mean()
    return torch.stack([torch.stack(r) for r in s_img]), torch.stack([torch.stack(r) for r in s_txt])


def naive_filip_loss(img, txt, mask, scale):
    s_img, s_txt = naive_filip_scores(img, txt, mask)
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = scale * s_img[i]
        col = scale * s_txt[:, i]
        total = total - (row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
    return 0.5 * total / n


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_filip_matches_naive_loop(chunk_size):
    img, txt, mask = filip_inputs(4, 4, 3, 5, 4, seed=10)
    t = log_scale()
    fast = FILIPLoss(chunk_size)(image_tokens=img, text_tokens=txt, text_mask=mask, logit_scale=t.exp())
    slow = naive_filip_loss(img, txt, mask, t.exp())
    assert_same_value_and_grads(fast, slow, (img, txt, t))


def test_filip_similarity_for_evaluation_with_unequal_batches():
    img, txt, mask = filip_inputs(3, 5, 4, 6, 4, seed=20)
    s_img, s_txt = filip_similarity(img, txt, mask, chunk_size=2)
    ref_img, ref_txt = naive_filip_scores(img, txt, mask)
    assert s_img.shape == s_txt.shape == (3, 5)
    assert torch.allclose(s_img, ref_img, atol=TOL) and torch.allclose(s_txt, ref_txt, atol=TOL)
    all_img, all_txt = filip_similarity(img, txt)  # no mask: every token counts
    ref_img, ref_txt = naive_filip_scores(img, txt, torch.ones_like(mask))
    assert torch.allclose(all_img, ref_img, atol=TOL) and torch.allclose(all_txt, ref_txt, atol=TOL)


def test_filip_padding_tokens_change_nothing():
    img, txt, mask = filip_inputs(4, 4, 3, 5, 4, seed=30)
    padding = unit(4, 3, 4, seed=33).detach() * 5  # large, so they would win any max they entered
    padded_txt = torch.cat([txt.detach(), padding], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    before = filip_similarity(img.detach(), txt.detach(), mask)
    after = filip_similarity(img.detach(), padded_txt, padded_mask)
    for a, b in zip(before, after, strict=True):  # equal up to the matmul's rounding
        assert torch.allclose(a, b, atol=1e-14, rtol=0)
    scale = torch.tensor(7.0, dtype=F64)
    loss = FILIPLoss()
    assert torch.allclose(loss(img, txt, scale, mask), loss(img, padded_txt, scale, padded_mask), atol=1e-14)
    # the mask may arrive as floats (the trainer casts its outputs with .float())
    assert torch.equal(loss(img, txt, scale, mask.to(F64)), loss(img, txt, scale, mask))


def test_filip_gradcheck():
    img, txt, mask = filip_inputs(3, 3, 2, 3, 3, seed=40)
    assert torch.autograd.gradcheck(
        lambda x, y, s: FILIPLoss(1)(x, y, s.exp(), mask), (img, txt, log_scale())
    )


# --- multi-positive ---------------------------------------------------------------------------------


def naive_multi_positive(img, txt, owner, scale):
    logits = [[scale * torch.dot(img[i], txt[j]) for j in range(txt.shape[0])] for i in range(img.shape[0])]
    i2t, images = 0.0, 0
    for i in range(img.shape[0]):
        own = [j for j in range(txt.shape[0]) if owner[j] == i]
        if not own:
            continue
        lse = torch.logsumexp(torch.stack(logits[i]), 0)
        i2t = i2t - sum(logits[i][j] - lse for j in own) / len(own)
        images += 1
    t2i = 0.0
    for j in range(txt.shape[0]):
        col = torch.stack([logits[i][j] for i in range(img.shape[0])])
        t2i = t2i - (col[int(owner[j])] - torch.logsumexp(col, 0))
    return 0.5 * (i2t / images + t2i / txt.shape[0])


@pytest.mark.parametrize(
    "owner",
    [
        [0, 0, 1, 1, 1, 2, 3, 3, 2],  # 2-3 captions per image
        [2, 0, 3, 1, 0, 2, 3, 1],  # interleaved
        [0, 0, 1, 2, 2, 2],  # image 3 has no caption: no image→text term for it
    ],
)
def test_multi_positive_matches_naive_loop(owner):
    owner = torch.tensor(owner)
    img, txt, t = unit(4, 5, seed=50), unit(len(owner), 5, seed=51), log_scale()
    fast = MultiPositiveInfoNCE()(
        image_features=img, text_features=txt, caption_owner=owner, logit_scale=t.exp()
    )
    slow = naive_multi_positive(img, txt, owner, t.exp())
    assert_same_value_and_grads(fast, slow, (img, txt, t))


def test_multi_positive_is_infonce_with_one_caption_each():
    img, txt, t = unit(6, 4, seed=60), unit(6, 4, seed=61), log_scale()
    fast = MultiPositiveInfoNCE()(img, txt, torch.arange(6), t.exp())
    assert_same_value_and_grads(fast, InfoNCE()(img, txt, t.exp()), (img, txt, t))
    # and the owner may arrive as floats
    assert torch.allclose(MultiPositiveInfoNCE()(img, txt, torch.arange(6.0), t.exp()), fast, atol=TOL)


def naive_same_text_positive(img, txt, owner, key, scale):
    """UniCL's positives: image i and caption j pair up when one of i's own captions has j's key."""
    n, t = img.shape[0], txt.shape[0]
    logits = [[scale * torch.dot(img[i], txt[j]) for j in range(t)] for i in range(n)]
    pos = [
        {j for j in range(t) if any(owner[m] == i and key[m] == key[j] for m in range(t))} for i in range(n)
    ]
    i2t, rows = 0.0, 0
    for i in range(n):
        if not pos[i]:
            continue
        rows += 1
        row = torch.stack(logits[i])
        i2t = i2t - sum(row[j] - torch.logsumexp(row, 0) for j in pos[i]) / len(pos[i])
    t2i = 0.0
    for j in range(t):
        col = torch.stack([logits[i][j] for i in range(n)])
        q = [i for i in range(n) if j in pos[i]]
        t2i = t2i - sum(col[i] - torch.logsumexp(col, 0) for i in q) / len(q)
    return 0.5 * (i2t / rows + t2i / t)


def test_multi_positive_same_text_is_unicl_and_plain_without_repeats():
    owner = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    key = torch.tensor([10, 11, 12, 11, 13, 10, 14])  # images 0, 1 and 2 share texts
    img, txt, t = unit(4, 5, seed=52), unit(7, 5, seed=53), log_scale()
    loss = MultiPositiveInfoNCE(same_text_positive=True)
    fast = loss(img, txt, owner, t.exp(), caption_key=key)
    assert_same_value_and_grads(fast, naive_same_text_positive(img, txt, owner, key, t.exp()), (img, txt, t))
    plain = MultiPositiveInfoNCE(same_text_positive=False)(img, txt, owner, t.exp(), caption_key=key)
    assert not torch.allclose(fast, plain)  # repeated texts change the loss ...
    distinct = torch.arange(7)  # ... and distinct texts give the plain multi-positive loss
    assert torch.allclose(loss(img, txt, owner, t.exp(), caption_key=distinct), plain, atol=TOL)


def test_multi_positive_same_text_option():
    with pytest.raises(ValueError, match="true or false"):
        MultiPositiveInfoNCE(same_text_positive="no")
    assert "caption_key" not in MultiPositiveInfoNCE().inputs  # not computed or gathered when off
    assert "caption_key" in MultiPositiveInfoNCE(same_text_positive=True).inputs


def test_caption_keys_equal_exactly_for_equal_token_ids():
    from lipkit.train.inputs import caption_keys

    ids = torch.tensor([[1, 5, 9, 0], [1, 5, 9, 0], [1, 9, 5, 0], [1, 5, 9, 2]])
    k = caption_keys(ids).tolist()
    assert k[0] == k[1] and len({k[0], k[2], k[3]}) == 3


def test_multi_positive_gradcheck():
    owner = torch.tensor([0, 1, 1, 2, 0])
    img, txt = unit(3, 3, seed=70), unit(5, 3, seed=71)
    loss = MultiPositiveInfoNCE()
    assert torch.autograd.gradcheck(lambda x, y, s: loss(x, y, owner, s.exp()), (img, txt, log_scale()))


# --- ALIP -------------------------------------------------------------------------------------------


def naive_alip_weights(img, raw, syn, gamma):
    n = img.shape[0]
    dot = lambda a, b: float(torch.dot(a.detach(), b.detach()))  # noqa: E731
    a = [dot(raw[i], syn[i]) for i in range(n)]
    b = [dot(img[i], raw[i]) for i in range(n)]
    e = [dot(img[i], syn[i]) for i in range(n)]
    w, v = [], []
    for i in range(n):
        sample = min(1.0, math.exp(gamma * (a[i] - sum(a) / n)))
        gated = sample < 1
        w.append(sample * (math.exp(gamma * (b[i] - sum(b) / n)) if gated else 1.0))
        v.append(sample * (math.exp(gamma * (e[i] - sum(e) / n)) if gated else 1.0))
    return w, v


def naive_weighted_clip(img, txt, scale, weights):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = torch.stack([scale * torch.dot(img[i], txt[j]) for j in range(n)])
        col = torch.stack([scale * torch.dot(img[j], txt[i]) for j in range(n)])
        total = total + weights[i] * 0.5 * (
            -(row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
        )
    return total / sum(weights)


@pytest.mark.parametrize("gamma", [2.0, 5.0])
def test_alip_matches_naive_loop(gamma):
    img, raw, syn, t = unit(8, 4, seed=80), unit(8, 4, seed=81), unit(8, 4, seed=82), log_scale()
    w, v = naive_alip_weights(img, raw, syn, gamma)
    assert 0 < sum(x < 1 for x in w) < 8  # the gate fires for some samples and not for others
    fw, fv = alip_weights(img, raw, syn, gamma)
    assert not fw.requires_grad and not fv.requires_grad
    assert torch.allclose(fw, torch.tensor(w, dtype=F64), atol=TOL)
    assert torch.allclose(fv, torch.tensor(v, dtype=F64), atol=TOL)
    fast = ALIPLoss(gamma, momentum=0.0)(
        image_features=img, text_features=raw, synth_features=syn, logit_scale=t.exp()
    )
    slow = 0.5 * (naive_weighted_clip(img, raw, t.exp(), w) + naive_weighted_clip(img, syn, t.exp(), v))
    assert_same_value_and_grads(fast, slow, (img, raw, syn, t))


def test_alip_with_equal_weights_is_the_averaged_clip_losses():
    img, raw, syn, t = unit(6, 4, seed=90), unit(6, 4, seed=91), unit(6, 4, seed=92), log_scale()
    plain = 0.5 * (InfoNCE()(img, raw, t.exp()) + InfoNCE()(img, syn, t.exp()))
    assert_same_value_and_grads(ALIPLoss(gamma=0.0)(img, raw, syn, t.exp()), plain, (img, raw, syn, t))
    constant = torch.full((6,), 0.3, dtype=F64)
    assert torch.allclose(
        weighted_clip_loss(img, raw, t.exp(), constant), InfoNCE()(img, raw, t.exp()), atol=TOL
    )


def test_alip_gradcheck():
    img, raw, syn = unit(4, 3, seed=93), unit(4, 3, seed=94), unit(4, 3, seed=95)
    weights = torch.tensor([0.2, 1.0, 0.7, 3.0], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda x, y, s: weighted_clip_loss(x, y, s.exp(), weights), (img, raw, log_scale())
    )
    # the full loss with the gates off (its weights are constants without gradient by design)
    assert torch.autograd.gradcheck(
        lambda x, y, c, s: ALIPLoss(0.0)(x, y, c, s.exp()), (img, raw, syn, log_scale())
    )


# --- TCL --------------------------------------------------------------------------------------------


def test_tcl_matches_naive_loop():
    img, txt, img2, txt2 = (unit(5, 4, seed=s) for s in (100, 101, 102, 103))
    t = log_scale()
    fast = TripleContrast(intra_weight=0.3)(
        image_features=img,
        text_features=txt,
        image_features_2=img2,
        text_features_2=txt2,
        logit_scale=t.exp(),
    )
    s = t.exp()
    slow = naive_infonce(img, txt, s) + 0.3 * (naive_infonce(img, img2, s) + naive_infonce(txt, txt2, s))
    assert_same_value_and_grads(fast, slow, (img, txt, img2, txt2, t))
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, e: TripleContrast()(a, b, c, d, e.exp()), (img, txt, img2, txt2, log_scale())
    )


# --- LexLIP -----------------------------------------------------------------------------------------


def test_lexicon_head_matches_loop_is_nonnegative_and_respects_mask():
    torch.manual_seed(0)
    head = LexiconHead(width=4, vocab_size=7).double()
    tokens = torch.randn(2, 3, 4, dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = head(tokens, mask)
    assert out.shape == (2, 7) and (out >= 0).all() and (out == 0).any()
    lin = head.proj.requires_grad_(False)
    for b in range(2):
        for v in range(7):
            acts = [
                math.log1p(max(0.0, float(lin.weight[v] @ tokens[b, k] + lin.bias[v])))
                for k in range(3)
                if mask[b, k]
            ]
            assert math.isclose(float(out[b, v].detach()), max(acts), abs_tol=TOL)
    lin.requires_grad_(True)
    changed = tokens.clone()
    changed[~mask] = 100.0  # masked tokens can be anything
    assert torch.equal(head(changed, mask), out)
    assert (head(tokens) >= out).all()  # without the mask every token competes


def test_lexicon_head_starts_sparse_and_input_dependent():
    """The init that keeps LexLIP alive: a few percent of terms fire, and which ones depends on the input
    (PyTorch's default init gave every image the same bias-driven terms, and training collapsed)."""
    torch.manual_seed(0)
    head = LexiconHead(width=192, vocab_size=8192)
    tokens = F.normalize(torch.randn(8, 65, 192), dim=-1)  # like the tiny ViT's 64 patches + class token
    with torch.no_grad():
        w = head(tokens)
    active = (w > 0).float()
    assert 0.02 < active.mean() < 0.5
    overlap = (active[0] * active[1]).sum() / active[0].sum()
    assert overlap < 0.6  # two images share only part of their terms


def test_flops_and_nonzero_terms():
    w = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]], dtype=F64)
    assert nonzero_terms(w).item() == 1.5
    assert nonzero_terms(torch.zeros(3, 5)).item() == 0.0
    expected = sum((sum(float(w[b, v]) for b in range(2)) / 2) ** 2 for v in range(4))
    assert math.isclose(flops_loss(w).item(), expected)


def test_lexicon_contrast_matches_naive_loop():
    g = torch.Generator().manual_seed(110)
    img = torch.relu(torch.randn(5, 9, generator=g, dtype=F64)).requires_grad_()
    txt = torch.relu(torch.randn(5, 9, generator=g, dtype=F64)).requires_grad_()
    t = log_scale(0.5)
    fast = LexiconContrast(flops_weight=0.05, temperature=None, flops_warmup=0)(
        image_lexicon=img, text_lexicon=txt, logit_scale=t.exp()
    )

    def flops(w):
        return sum((sum(w[b, v] for b in range(w.shape[0])) / w.shape[0]) ** 2 for v in range(w.shape[1]))

    slow = naive_infonce(img, txt, t.exp()) + 0.05 * (flops(img) + flops(txt))
    assert_same_value_and_grads(fast, slow, (img, txt, t))
    loss = LexiconContrast(flops_weight=0.05, temperature=None, flops_warmup=0)
    assert torch.autograd.gradcheck(lambda a, b, s: loss(s.exp(), a, b), (img, txt, t))
    # a fixed temperature τ scores <w_i, w_j> / τ whatever the model's scale
    fixed = LexiconContrast(flops_weight=0.05, temperature=0.5, flops_warmup=0)(
        image_lexicon=img, text_lexicon=txt, logit_scale=t.exp()
    )
    slow = naive_infonce(img, txt, torch.tensor(2.0, dtype=F64)) + 0.05 * (flops(img) + flops(txt))
    assert torch.allclose(fixed, slow, atol=1e-10)


def test_lexicon_flops_warmup_and_dense_term():
    g = torch.Generator().manual_seed(111)
    img, txt = (torch.relu(torch.randn(5, 9, generator=g, dtype=F64)) for _ in range(2))
    x, y = (F.normalize(torch.randn(5, 4, generator=g, dtype=F64), dim=-1) for _ in range(2))
    s = torch.tensor(3.0, dtype=F64)

    def flops(w):
        return sum((sum(w[b, v] for b in range(w.shape[0])) / w.shape[0]) ** 2 for v in range(w.shape[1]))

    loss = LexiconContrast(flops_weight=0.05, temperature=None, flops_warmup=4, dense_weight=0.5)
    assert set(loss.inputs) >= {"image_features", "text_features", "image_lexicon", "text_lexicon"}
    for t in range(6):  # λ_t = λ · min(1, (t / T)²), then μ · dense InfoNCE
        expected = naive_infonce(img, txt, s) + 0.05 * min(1.0, (t / 4) ** 2) * (flops(img) + flops(txt))
        expected = expected + 0.5 * naive_infonce(x, y, s)
        got = loss(logit_scale=s, image_lexicon=img, text_lexicon=txt, image_features=x, text_features=y)
        assert torch.allclose(got, expected, atol=1e-10), t
    assert int(loss.state_dict()["steps_seen"]) == 6  # checkpointed with the run
    with torch.no_grad():  # evaluation does not advance the warm-up
        loss(logit_scale=s, image_lexicon=img, text_lexicon=txt, image_features=x, text_features=y)
    assert int(loss.steps_seen) == 6
    assert loss.last_stats["lexicon/image_nonzero_terms"].item() == float((img != 0).sum(1).double().mean())


# --- registry ---------------------------------------------------------------------------------------


def test_registry_builds_every_objective_and_rejects_unknown_ones():
    """Every registered objective (read from OBJECTIVES, so a new one is covered) builds by name with its
    defaults and gives a finite scalar on the inputs it declares."""
    assert {"infonce", "siglip", "clip_refine"} <= set(OBJECTIVES)
    for name, cls in OBJECTIVES.items():
        objective = build_objective(name)
        assert type(objective) is cls, name
        loss = objective(**objective_inputs(objective))
        assert loss.ndim == 0 and torch.isfinite(loss), name
    assert build_objective("siglip", chunk_size=16).chunk_size == 16
    assert build_objective("tcl", intra_weight=0.5).intra_weight == 0.5
    with pytest.raises(UserError, match="Unknown objective 'nope'"):
        build_objective("nope")
    with pytest.raises(UserError, match="chunk_sise"):
        build_objective("siglip", chunk_sise=16)
    with pytest.raises(UserError):
        build_objective("siglip", chunk_size=0)


def test_every_objective_takes_a_superset_of_inputs_and_ignores_the_rest():
    """What a trainer does: compute everything any objective reads, pass it all as keywords."""
    out = {**every_input(), "something_else": torch.zeros(1)}
    for name in OBJECTIVES:
        objective = build_objective(name)
        size_heads(objective, out["image_features"].shape[-1])
        loss = objective(**out)
        assert loss.ndim == 0 and torch.isfinite(loss), name
        needed = declared_inputs(objective)
        tensors = [out[k] for k in needed if torch.is_tensor(out[k])]  # the match head is a module
        grads = torch.autograd.grad(loss, [x for x in tensors if x.requires_grad])
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name
