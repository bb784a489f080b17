"""Two gloo processes on the CPU train exactly like one process on the same global batch, for every
registered objective and the demo recipe; gradient caching gives the gradients of the plain step.

Every two-rank case runs inside ONE two-process spawn (the module fixture `two_ranks`): each case is a
few steps of a tiny model, so the spawn's start-up dominates and is paid once."""

import copy
import dataclasses
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import free_port
from lipkit.config import AugmentConfig, TrainConfig, load_config
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import IMAGENET_MEAN, IMAGENET_STD, get_spec
from lipkit.objectives import OBJECTIVES, build_objective
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train import fsdp
from lipkit.train.concepts import ConceptTable
from lipkit.train.distributed import Dist, sync_step
from lipkit.train.growth import grow_trainer
from lipkit.train.inputs import INPUTS, objective_needs, requires
from lipkit.train.launch import _build_model
from lipkit.train.regions import RegionTable
from lipkit.train.sample_labels import SampleLabels
from lipkit.train.trainer import Trainer
from test_local_losses import LOCAL_CASES
from tiny_batch import BATCH, SPEC, WORDS, batch, clips


def make_trainer(tmp: Path, rank: int, world: int, per_image: int = 1, **train) -> Trainer:
    """A tiny model for `train.objective`, with what its inputs require (train.inputs.INPUTS): a logit
    bias, lexicon heads, or a teacher (the frozen starting model, as `lipkit refine` makes it)."""
    if train.pop("demo", False):
        return demo_trainer(tmp, rank, world, per_image, **train)
    # OpenCLIP's CoCa layout: an attentional pooler, a [cls] text token, the decoder reading the text states
    layout = dict(OPEN_CLIP_COCA) if train.pop("open_clip_coca", False) else {}
    torch.manual_seed(0)
    tok = TextTokenizer.train(WORDS * 3, vocab_size=300, context_length=12)
    cfg = TrainConfig(batch_size=BATCH, **{"grad_clip": 0.0, **train})
    objective = build_objective(cfg.objective, **cfg.objective_args)
    needs = objective_needs(objective)
    lexicon = tok.vocab_size if requires(needs, "lexicon") else 0
    bias = requires(needs, "bias")
    text_only = requires(needs, "text_captioner")  # a decoder on noised text embeddings (capdec)
    prefix = requires(needs, "prefix_captioner")  # a language model reading soft prompts (text_lm, connector)
    caption = 2 if requires(needs, "captioner") or text_only or prefix else 0  # CoCa's decoder
    settings = dict(
        SPEC,
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        lexicon_vocab=lexicon,
        logit_bias=bias,
        caption_layers=caption,
        caption_input="embedding" if text_only else "prefix" if prefix else "tokens",
        match_layers=1 if requires(needs, "matcher") else 0,  # the itm objective's fusion head
    )
    if "frame_features" in needs:  # EZ-CLIP: clips of 4 frames through its prompted ViT
        settings.update(temporal="ezclip", temporal_frames=4)
    spec = get_spec("tiny", **{**settings, **layout})
    model = DualEncoder(spec)
    if text_only:  # noise drawn per sample and step: the same rows on 1 or 2 ranks
        model.captioner.noise_std.fill_(0.3)
    teacher = copy.deepcopy(model).requires_grad_(False) if requires(needs, "teacher") else None
    if (
        cfg.objective == "distill"
    ):  # a teacher of another width, image size and normalisation than the student
        wide = dataclasses.replace(spec, embed_dim=spec.embed_dim + 8, image_size=spec.image_size + 8)
        teacher = DualEncoder(dataclasses.replace(wide, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD))
    labels = {}
    if requires(
        needs, "clusters"
    ):  # MLCD: 2 of 5 clusters per record (one without any), bound as launch does
        rows = [[i % 5, (i + 2) % 5] if i != 5 else [] for i in range(BATCH)]
        labels["clusters"] = SampleLabels([f"row-{i}" for i in range(BATCH)], rows, 5)
        if hasattr(objective, "bind"):  # MLCD's class centres
            objective.bind(5, spec.embed_dim)
    if requires(
        needs, "columns"
    ):  # PLIP: identities shared across ranks, a 2-class attribute, one row without
        rows = [[i % 3, i % 2] if i != 2 else [-1, -1] for i in range(BATCH)]
        labels["columns"] = SampleLabels([f"row-{i}" for i in range(BATCH)], rows, 0)
        objective.bind_columns([["a", "b", "c"], ["x", "y"]], spec.embed_dim)
    if requires(needs, "regions"):  # CLOC: 0–3 boxes per image, captions repeating across images and ranks
        boxes = [
            [[0.1 * j, 0.05 * i, 0.5 + 0.1 * j, 0.6 + 0.04 * i] for j in range(i % 4)] for i in range(BATCH)
        ]
        names = [[WORDS[(i + j) % 5] for j in range(i % 4)] for i in range(BATCH)]
        labels["regions"] = RegionTable([f"row-{i}" for i in range(BATCH)], boxes, names, tok)
    if requires(
        needs, "concepts"
    ):  # ConceptCLIP: the caption's two words, one it does not spell, a row without
        rows = [[WORDS[i % 12], "zebra", WORDS[(i * 5 + 3) % 12]] if i != 5 else [] for i in range(BATCH)]
        labels["concepts"] = ConceptTable([f"row-{i}" for i in range(BATCH)], rows, tok)
    return Trainer(
        model,
        objective,
        tok,
        cfg,
        AugmentConfig(),
        tmp,
        torch.device("cpu"),
        captions_per_image=per_image,
        dist=Dist(rank, world),
        teacher=teacher,
        sample_labels=labels,
    )


DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# only what must shrink to run in seconds: 32-pixel images and a 16-d embedding (the pretrained
# EfficientNet-Lite0 image tower with its top groups trainable and frozen BatchNorm statistics, and the
# pretrained MiniLM text tower, locked but for its projection, stay), 8 images a step, fp32
DEMO_SHRINK = {"image_size": 32, "embed_dim": 16}


class _NoCaptions:
    def captions(self) -> list[str]:  # the demo's tokenizer is the pretrained tower's: none is trained
        raise AssertionError("the demo recipe trains no tokenizer")


def demo_trainer(tmp: Path, rank: int, world: int, per_image: int, **train) -> Trainer:
    """configs/demo.yaml as `lipkit train` builds it (launch._build_model), shrunk as DEMO_SHRINK says."""
    cfg = load_config(DEMO)
    assert per_image == cfg.data.captions_per_image  # the test batch has the demo's captions per image
    cfg.model.overrides.update(DEMO_SHRINK)
    cfg.train.batch_size, cfg.train.precision = BATCH, "fp32"
    # as the demo runs under torchrun: its trained groups' BatchNorm statistics frozen (batch statistics,
    # the single-process demo's setting, are refused on several ranks: test_timm_networks)
    cfg.train.freeze_bn_stats = True
    for key, value in train.items():
        setattr(cfg.train, key, value)
    torch.manual_seed(cfg.train.seed)  # as launch.run_training: every rank builds the same model
    tokenizer, model, objective, teacher = _build_model(cfg, _NoCaptions(), None)
    assert model.spec.vision_tower == "timm" and model.spec.text_tower == "hf"
    return Trainer(
        model,
        objective,
        tokenizer,
        cfg.train,
        cfg.augment,
        tmp,
        torch.device("cpu"),
        cfg.data.captions_per_image,
        Dist(rank, world),
        teacher,
    )


def one_step(
    tmp: Path, rank: int, world: int, per_image: int = 1, steps: int = 1, label_first: bool = False, **train
) -> dict[str, torch.Tensor]:
    """`steps` AdamW steps at lr 1e-3 on the test batch: the first step's loss and gradients, the
    weights and AdamW moments after the last, and those moments again after a resume. `label_first`: each
    image's last caption (the label caption shared across ranks) first, so first captions repeat."""
    trainer = make_trainer(tmp, rank, world, per_image, **dict(train))
    model, cfg = trainer.model, trainer.cfg
    images, captions = batch(per_image)
    if model.spec.temporal == "ezclip":
        images = clips()
    if label_first:
        captions = [
            c
            for i in range(BATCH)
            for c in (lambda own: own[-1:] + own[:-1])(captions[i * per_image : (i + 1) * per_image])
        ]
    b = BATCH // world  # this rank's share, as the data sources hand it out
    images, captions = (
        images[rank * b : (rank + 1) * b],
        captions[rank * b * per_image : (rank + 1) * b * per_image],
    )
    keys = [f"row-{i}" for i in range(rank * b, (rank + 1) * b)]  # the records' keys (NEVLP's sample ids)
    grads: dict[str, torch.Tensor] = {}
    for i in range(steps):
        loss, finite = trainer.step(images, captions, lr=1e-3, keys=keys)
        assert finite
        if i == 0:  # full tensors (under FSDP each rank holds shards: gathering is a collective)
            first_loss = loss.reshape(1)
            grads = {
                f"grad.{n}": fsdp.full(p.grad).detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        if i + 1 in trainer.growth:  # train.grow: as Trainer.fit grows after that step
            grow_trainer(trainer, trainer.growth[i + 1], i + 1)
    model = trainer.model
    if cfg.strategy == "fsdp" and world > 1:  # each rank really holds about half of the trained weights
        # (a locked tower stays replicated, and so do the heads that are not FSDP units: decoder, matcher)
        heads = ("captioner.", "matcher.")
        trained = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(heads)]
        local = sum(p.to_local().numel() if fsdp.is_sharded(p) else p.numel() for p in trained)
        assert local < 0.55 * sum(p.numel() for p in trained)
    assert len(grads) > (4 if cfg.lock_text else 20)  # the demo's locked text tower has few
    # the trained weights (the demo's locked MiniLM backbone is left out: 22M weights nothing changes)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    weights = {
        f"param.{n}": fsdp.full(p).detach().clone() for n, p in model.named_parameters() if n not in frozen
    }
    state = trainer.training_state()  # AdamW moments after the steps, as a checkpoint stores them
    optim = {k: v.clone() for k, v in state[0].items() if k.startswith("optim.") and v.ndim}
    # an objective's own state (NEVLP's loss-history bank and mixture): the same on every rank
    own = {k: v.clone() for k, v in state[0].items() if k.startswith("objective.")}
    out = {"loss": first_loss, **grads, **weights, **optim, **own}
    if trainer.reducer is not None:  # buckets started during the last backward, of how many
        out["buckets"] = torch.tensor([trainer.reducer.early, len(trainer.reducer.buckets)])
    plain = trainer.unsharded()  # what eval and checkpoints read: every weight, in place (rank 0)
    if rank == 0:
        kept = {k: v for k, v in plain.state_dict().items() if k not in frozen}
        out.update({f"unsharded.{k}": v.detach().clone() for k, v in kept.items()})
    # resume: a fresh trainer loads the saved state (FSDP: full moments re-sharded) and gives it back
    again = make_trainer(tmp, rank, world, per_image, **dict(train))
    for at, g in again.growth.items():  # a resumed run's model grown as the one it continues
        if at <= steps:
            grow_trainer(again, g, at)
    again.load_training_state(state)
    back = again.training_state()[0]
    out.update({f"resumed.{k}": back[k].clone() for k in optim})
    if trainer.reducer is not None:  # the resumed trainer buckets (so sums) as the one it continues
        same = again.reducer.rebuilt and again.reducer.order() == trainer.reducer.order()
        out["buckets_resumed"] = torch.tensor([same])
    return out


def _worker(rank: int, world: int, port: int, tmp: str, cases: dict[str, dict]) -> None:
    """Every case, one after the other, in one process group; a case that fails writes its traceback
    (on both ranks alike: the objectives fail in their forward, before any backward collective)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    # a short timeout: ranks out of step fail here instead of hanging the suite
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for name, case in cases.items():
            try:
                out = one_step(Path(tmp), rank, world, **case)
                save_file(out, os.path.join(tmp, f"{name}.rank{rank}.safetensors"))
            except Exception:
                Path(tmp, f"{name}.rank{rank}.error").write_text(traceback.format_exc())
    finally:
        torch.distributed.destroy_process_group()


def _sync_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:  # rank 1 saw SIGTERM (15); rank 0 evaluated, so its training clock is behind
        signum, seconds = sync_step(15 if rank == 1 else None, 100.0 + 30 * rank)
        Path(tmp, f"sync{rank}.txt").write_text(f"{signum} {seconds}")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_signal_and_clock(tmp_path):
    """The time budget and the schedule follow one clock on every rank (else the ranks stop at different
    steps and the job hangs in a collective)."""
    mp.spawn(_sync_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"sync{r}.txt").read_text() for r in range(2)] == ["15 100.0"] * 2


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> dict[str, float]:
    """torch.allclose per tensor (gradients and AdamW moments to `atol` times the tensor's largest entry when
    that exceeds 1 — fp32 rounds relative to a sum's scale, and a summation order of its own (gradient
    caching, two ranks) moves a small entry of a large tensor by ~1e-6 of the large ones —, weights to
    1e-4; rtol 1e-5); returns the largest absolute difference of the gradients, moments and weights."""
    worst = {"grad": 0.0, "moment": 0.0, "param": 0.0}
    for k in a:
        x, y = a[k], b[k]
        kind = "grad" if k.startswith(("grad.", "loss")) else "moment"
        if k.startswith("objective."):  # an objective's own weights (heads, predictors) and state, moved by
            kind = "param"  # AdamW like the model's: ~lr per step where a gradient is rounding noise
        if k.startswith(("param.", "unsharded.")):
            kind, name = "param", k.split(".", 1)[1]
            # AdamW moves a weight by ~lr·g/(|g| + ε) a step: ~lr wherever |g| ≫ ε, so a gradient that is
            # zero in exact arithmetic and rounding noise here (the attention key bias: the softmax ignores a
            # shift) moves its weight by up to lr a step, differently in each run. Those weights are left
            # out; the others are compared to a tenth of one step (a missing update is off by ~lr).
            if f"grad.{name}" in b and b[f"grad.{name}"].shape == x.shape:  # (a grown weight: all of it)
                real = b[f"grad.{name}"].abs() > 1e-6
                x, y = x[real], y[real]
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        scale = max(1.0, y.abs().max().item()) if y.numel() and y.is_floating_point() else 1.0
        assert torch.allclose(x, y, atol=1e-4 if kind == "param" else atol * scale), (k, diff)
        worst[kind] = max(worst[kind], diff)
    return worst


def _distinct_objectives() -> dict[str, str]:
    """Every registered objective name → the one whose run it shares (aliases: one class, one run)."""
    first: dict[type, str] = {}
    return {name: first.setdefault(cls, name) for name, cls in OBJECTIVES.items()}


def objective_case(name: str) -> dict:
    """The default-option objective `name` on the test batch: two captions per image for those reading
    every caption (the registry says which), three AdamW steps."""
    needs = objective_needs(build_objective(name))
    per_image = 4 if requires(needs, "script") else 2 if any(INPUTS[n].every_caption for n in needs) else 1
    return {"objective": name, "per_image": per_image, "steps": 3}


def cacheable(name: str) -> bool:
    return all(INPUTS[n].cache is not None for n in objective_needs(build_objective(name)))


UNICL = {"objective": "multi_positive", "objective_args": {"same_text_positive": True}, "per_image": 3}
UNIME = {"objective": "unime", "objective_args": {"hard_negatives": 2}, "per_image": 3, "label_first": True}
PLIP = {"objective": "plip", "objective_args": {"identity": "person", "attributes": ["colour"]}, "steps": 3}
NEVLP = {"objective": "nevlp", "objective_args": {"warmup_steps": 1, "refit_every": 1}, "steps": 3}
NEVLP_MULTI = {**NEVLP, "objective_args": {**NEVLP["objective_args"], "multi_positive": True}, "per_image": 3}
DISTILL = {
    "objective": "distill",
    "objective_args": {"feature_weight": 1.0, "affinity_weight": 1.0, "kd_temperature": 2.0},
    "steps": 3,
}
ITM_OT = {"objective": "itm", "objective_args": {"ot_weight": 0.1}, "steps": 3}
OPEN_CLIP_COCA = {
    "text_width": 16,
    "text_embed_cls": True,
    "vision_attn_pool": 5,
    "vision_attn_pool_heads": 2,
    "caption_input": "text",
    "caption_heads": 2,
}
COCA_OC = {**objective_case("coca"), "open_clip_coca": True}
DEMO_CASE = {"demo": True, "steps": 3, "per_image": 3}  # the demo recipe's towers (a bidirectional MiniLM)
ITM_MLM = {**DEMO_CASE, "objective": "itm", "objective_args": {"mlm_weight": 1.0}}
# LexLIP's masked stage for 2 steps then its contrastive stage
LEXLIP_STAGES = {**DEMO_CASE, "objective": "lexlip", "objective_args": {"bottleneck_steps": 2}}
GROW = {"grow": [{"at_step": 1, "towers": "both", "width": 2, "depth": 1}], "steps": 3}
# name → (the two-rank case, the one-process reference)
CASES: dict[str, tuple[dict, dict]] = {
    **{
        f"objective-{n}": (objective_case(n), objective_case(n))
        for n in sorted(set(_distinct_objectives().values()))
    },
    **{  # gradient caching inside each rank (chunks of 3 and 1 of its 4 images) against the plain step
        f"objective-{n}-grad-cache": ({**objective_case(n), "grad_cache_chunk": 3}, objective_case(n))
        for n in sorted(set(_distinct_objectives().values()))
        if cacheable(n)
    },
    "demo-recipe": (DEMO_CASE, DEMO_CASE),
    "infonce-local-loss": ({"local_loss": True}, {}),
    "infonce-fsdp": ({"strategy": "fsdp"}, {}),
    "infonce-fsdp-local-loss": ({"strategy": "fsdp", "local_loss": True}, {}),
    # FSDP shards the LexLIP heads too; the global gradient norm over shards clips like one process (the
    # unclipped norm here is ~80, so clipping to 1 changes every gradient)
    **{
        f"{n}-fsdp-clip": (
            {"objective": n, "grad_clip": 1.0, "strategy": "fsdp"},
            {"objective": n, "grad_clip": 1.0},
        )
        for n in ("lexlip", "infonce")
    },
    "multi_positive-fsdp": (
        {**objective_case("multi_positive"), "strategy": "fsdp"},
        objective_case("multi_positive"),
    ),
    "multi_positive-fsdp-grad-cache": (
        {**objective_case("multi_positive"), "strategy": "fsdp", "grad_cache_chunk": 3},
        objective_case("multi_positive"),
    ),
    # UniCL positives: a label caption shared by images on both ranks pairs them up in the global batch
    # exactly as in one process (the caption keys are gathered with the features)
    "unicl": (UNICL, UNICL),
    "unicl-grad-cache": ({**UNICL, "grad_cache_chunk": 3}, UNICL),
    "unicl-fsdp": ({**UNICL, "strategy": "fsdp"}, UNICL),
    # NEVLP with its mixture fitted in every step from the second on: the banks (gathered sample ids) and the
    # weighted loss agree; multi-positive form with the demo's three captions
    "nevlp-fitted": (NEVLP, NEVLP),
    "nevlp-multi-positive-grad-cache": ({**NEVLP_MULTI, "grad_cache_chunk": 3}, NEVLP_MULTI),
    # UniME: first captions repeated within and across ranks (the duplicate mask comes from the gathered
    # caption keys) and top-2 hard negatives of the 8-image global batch
    **{
        f"unime-duplicates-top2{tail}": ({**UNIME, **extra}, UNIME)
        for tail, extra in (("", {}), ("-grad-cache", {"grad_cache_chunk": 3}))
    },
    # PLIP: identity positives across ranks and an attribute head (the labels gathered with the features)
    **{
        f"plip-identity-attributes{tail}": ({**PLIP, **extra}, PLIP)
        for tail, extra in (("", {}), ("-grad-cache", {"grad_cache_chunk": 3}))
    },
    # self-supervised image terms on the gathered batch: Barlow Twins' batch statistics and SimCLR's
    # negatives are the global batch's, as in one process
    **{
        f"improved_baselines-{ssl}": (case, case)
        for ssl in ("simclr", "barlow_twins", "simsiam", "byol", "swav")
        for case in [{"objective": "improved_baselines", "objective_args": {"image_ssl": ssl}}]
    },
    # distillation with every term: the teacher's features gathered plainly, its projections' gradients
    # averaged like the model's
    "distill-all-terms": (DISTILL, DISTILL),
    # ITM with UNITER's word–patch OT term: hard negatives mined from the gathered batch, the (replicated)
    # matching head scoring the same pairs on every rank; and under FSDP, where the head is not a unit
    "itm-ot": (ITM_OT, ITM_OT),
    "itm-ot-fsdp": ({**ITM_OT, "strategy": "fsdp"}, ITM_OT),
    # LexLIP's masked stage: masks seeded by the gathered captions, every rank re-encoding the global batch's
    # masked captions; the weak decoder is the objective's (averaged like the model's parameters)
    "lexlip-two-stages": (LEXLIP_STAGES, LEXLIP_STAGES),
    # under FSDP, where the sharded lexicon heads' raw logits are read outside their forward
    "lexlip-two-stages-fsdp": ({**LEXLIP_STAGES, "strategy": "fsdp"}, LEXLIP_STAGES),
    # UNITER's MLM through the matching head, on the demo's towers: the same masks on every rank
    "itm-mlm": (ITM_MLM, ITM_MLM),
    # a caption decoder under FSDP: the sharded image tower's tokens feed the replicated decoder, whose
    # parameters AdamW updates apart from the shards (one fused call cannot mix them: train.optim)
    "coca-fsdp": ({**objective_case("coca"), "strategy": "fsdp"}, objective_case("coca")),
    # OpenCLIP's CoCa layout: the decoder runs the text tower again (its states) inside the caption term
    "coca-open-clip": (COCA_OC, COCA_OC),
    "coca-open-clip-fsdp": ({**COCA_OC, "strategy": "fsdp"}, COCA_OC),
    "distill-all-terms-grad-cache": ({**DISTILL, "grad_cache_chunk": 3}, DISTILL),
    # growth after the first step (width ×2 and a block per tower): the grown model, its rebuilt DDP
    # buckets and its carried moments agree on both ranks with one process
    "infonce-grow": (GROW, GROW),
    "infonce-grow-grad-cache": ({**GROW, "grad_cache_chunk": 3}, GROW),
    # gradients averaged in many small buckets started during the backward, and in one after it
    "infonce-small-buckets": ({"bucket_cap_mb": 0.002, "steps": 3}, {"steps": 3}),
    "lexlip-small-buckets": (
        {"objective": "lexlip", "bucket_cap_mb": 0.002, "steps": 3},
        {"objective": "lexlip", "steps": 3},
    ),
    "infonce-one-all-reduce": ({"bucket_cap_mb": 0}, {}),
    "infonce-grad-cache-small-buckets": (
        {"bucket_cap_mb": 0.002, "grad_cache_chunk": 3, "steps": 3},
        {"steps": 3},
    ),
    # the local forms of train/local_losses.py (SigLIP's ring, rows of multi-positive, UniCL and FILIP)
    **LOCAL_CASES,
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("two_ranks")
    cases = {name: two for name, (two, _) in CASES.items()}
    mp.spawn(_worker, args=(2, free_port(), str(tmp), cases), nprocs=2, join=True)
    return tmp


def ranks_of(tmp: Path, name: str) -> list[dict[str, torch.Tensor]]:
    for r in range(2):
        error = tmp / f"{name}.rank{r}.error"
        if error.exists():
            pytest.fail(f"rank {r} of case {name} failed:\n{error.read_text()}")
    return [load_file(str(tmp / f"{name}.rank{r}.safetensors")) for r in range(2)]


def test_the_cases_cover_every_registered_objective():
    """Read from the registry: a new objective is in the two-rank sweep without touching this file."""
    names = _distinct_objectives()
    assert {n for n in OBJECTIVES} == set(names) and "clip_refine" in names
    for name in set(names.values()):
        assert f"objective-{name}" in CASES
        assert (f"objective-{name}-grad-cache" in CASES) == cacheable(name)


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_ranks_equal_one_process(two_ranks, tmp_path, case):
    """fp32: every rank holds the averaged gradient of the global loss (to 1e-5), the same weights after
    the steps (to 1e-4) and (gathered) the same AdamW moments, before and after a resume."""
    two, one = CASES[case]
    single = one_step(tmp_path, 0, 1, **one)
    ranks = ranks_of(two_ranks, case)
    same = {k: v for k, v in single.items() if k != "loss"}
    worst = [
        assert_close({k: r[k] for k in same if rank == 0 or not k.startswith("unsharded.")}, same)
        for rank, r in enumerate(ranks)
    ]
    print(f"{case}: max |diff| " + ", ".join(f"{k} {max(w[k] for w in worst):.1e}" for k in worst[0]))
    losses = torch.stack([r["loss"] for r in ranks])
    if two.get("local_loss"):  # each rank owns half the rows: their mean is the global loss
        assert torch.allclose(losses.mean(), single["loss"], atol=1e-5)
    else:
        assert torch.allclose(losses, single["loss"].expand(2), atol=1e-5)


def test_gradient_buckets_start_during_the_backward(two_ranks):
    """Small buckets: after the first step's rebuild all but at most the last (the parameters a pass does
    not reach) start their all-reduce before the backward ends (the overlap); the gradients equal one
    process (test_two_gloo_ranks_equal_one_process, same cases)."""
    for name in ("infonce-small-buckets", "lexlip-small-buckets"):
        early, total = ranks_of(two_ranks, name)[0]["buckets"].tolist()
        assert total > 5 and early >= total - 1, (name, early, total)
    for name in ("infonce-small-buckets", "lexlip-small-buckets", "objective-siglip"):
        assert all(bool(r["buckets_resumed"]) for r in ranks_of(two_ranks, name)), name
    early, total = ranks_of(two_ranks, "infonce-one-all-reduce")[0]["buckets"].tolist()
    assert total == 1
    early, total = ranks_of(two_ranks, "infonce-grad-cache-small-buckets")[0]["buckets"].tolist()
    assert total > 5 and early >= total - 1  # gradient caching: buckets start in its last backward pass


@pytest.mark.parametrize("name", sorted(n for n in set(_distinct_objectives().values()) if cacheable(n)))
def test_gradient_caching_equals_the_plain_step(tmp_path, name):
    """One process, chunks of 3, 3 and 2 images, for every objective the registry marks cacheable."""
    plain = one_step(tmp_path, 0, 1, **objective_case(name))
    cached = one_step(tmp_path, 0, 1, **objective_case(name), grad_cache_chunk=3)
    assert_close(cached, plain)


def test_gradient_caching_refuses_an_input_it_cannot_cache(tmp_path, monkeypatch):
    """An input the registry marks uncacheable: one sentence naming the objective, the input and the fix."""
    monkeypatch.setitem(INPUTS, "image_tokens", dataclasses.replace(INPUTS["image_tokens"], cache=None))
    with pytest.raises(UserError) as e:
        make_trainer(tmp_path, 0, 1, objective="filip", grad_cache_chunk=3)
    assert str(e.value) == (
        "train.grad_cache_chunk cannot cache the objective 'filip' input image_tokens; "
        "unset train.grad_cache_chunk."
    )
    make_trainer(tmp_path, 0, 1, objective="filip")  # without gradient caching it trains


def test_gradient_caching_replays_dropout(tmp_path):
    """A tower with dropout (an unlocked Hugging Face encoder has some): each chunk's re-embedding draws
    the same masks as its cached no-grad pass, so the features whose gradients were cached are the ones
    back-propagated (without the replay they differ in every chunk)."""
    trainer = make_trainer(tmp_path, 0, 1, 1, objective="infonce", grad_cache_chunk=3)
    visual = trainer.model.visual
    visual.ln_post = torch.nn.Sequential(visual.ln_post, torch.nn.Dropout(0.5))
    seen = []
    real = trainer._inputs

    def spy(images, ids, second, only=None, keys=None):
        out = real(images, ids, second, only, keys)
        if "image_features" in out:  # not the whole-batch call for the logit scale
            seen.append(out["image_features"].detach().clone())
        return out

    trainer._inputs = spy
    images, captions = batch(1)
    _, finite = trainer.step(images, captions, lr=1e-3)
    assert finite and len(seen) == 6  # 3 chunks (3, 3, 2 images), twice
    for cached, again in zip(seen[:3], seen[3:], strict=True):
        assert torch.allclose(cached, again, atol=1e-6)


def test_batch_not_divisible_by_ranks_is_refused(tmp_path):
    with pytest.raises(UserError, match="not divisible by the 3 ranks"):
        tok = TextTokenizer.train(WORDS, vocab_size=300, context_length=12)
        model = DualEncoder(get_spec("tiny", **SPEC, vocab_size=tok.vocab_size, eot_id=tok.eot_id))
        Trainer(
            model,
            build_objective("infonce"),
            tok,
            TrainConfig(batch_size=8),
            AugmentConfig(),
            tmp_path,
            torch.device("cpu"),
            dist=Dist(0, 3),
        )


def test_shared_label_captions_change_the_unicl_loss(tmp_path):
    """The `unicl` cases are not vacuous: the label captions shared across ranks do pair images up."""
    unicl = one_step(tmp_path, 0, 1, **UNICL)
    plain = one_step(tmp_path, 0, 1, **{**UNICL, "objective_args": {}})
    assert not torch.allclose(unicl["loss"], plain["loss"])
