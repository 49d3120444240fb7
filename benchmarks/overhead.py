"""Training-step overhead of probes, as ratios against the plain step of the same model measured in the same run.

Every row is one training step (forward, loss, backward, optimizer step, and ``session.step()`` where a session
is attached) on one thread (``torch.set_num_threads(1)``). The cases of one model are measured in interleaved
rounds (``_timing.rotated_rounds``): in every round each case runs one block of steps, the order rotating from
round to round, and a row's ratio is the median over rounds of its block's time over the plain step's block of
the same round (``_timing.paired_ratios``). A session is attached before its case's block and detached after it,
both untimed, with one untimed step after attaching (every plain block gets one untimed step too), so a plain
step runs with no session anywhere in the process. Flushes of ``relu_zeros`` (every 100 steps) fall outside the
blocks; their cost is printed on its own line. ``extra/step`` is ``(ratio - 1) x plain step``; ``us/site call``
divides it by the site calls of one step (the activation calls ``relu_zeros`` observes in one training forward,
counted from its records after one step; for the second model, the site calls it would have if attached).

Rows, each against its own model's plain step (goals printed, never enforced: the script exits 0):

1. a 24-block ``Linear(64, 64) - LayerNorm - ReLU`` MLP (one flat ``nn.Sequential``, 73 modules), batch 32,
   SGD: ``relu_zeros`` attached (goal <= 1.15x); ``alignment`` on a 64-sample probe batch, the steps between its
   measurements (attached once for the whole run, steady state: what ``session.step()`` costs when nothing is due;
   goal <= 1.01x; the active-probe rows below are measured the same way); a second instance of the MLP that is
   not attached (a teacher, an EMA copy) taking a training step while the first is attached with ``relu_zeros``
   (goal <= 1.01x).
2. GPT-2 built from ``transformers.GPT2Config`` (no weights downloaded): 4 layers, width 128, 4 heads, sequence
   64, batch 8, AdamW, vocabulary 1024 (the GPT-2 tokenizer's 50257 would put most of the step in the embedding
   and its AdamW update); ``relu_zeros`` with ``sites="all"`` (goal <= 1.02x). Skipped, with the reason printed,
   without transformers.
3. a CIFAR ResNet-18 (``_resnet.py``: BasicBlocks, BatchNorm, a ReLU module called twice per block), width 64,
   3 x 32 x 32 inputs, SGD, batch 8 (``--quick``: 4); ``relu_zeros`` (goal <= 1.02x).
4. seed 003: the 784-750-320-50-10 MLP with one shared ``nn.ReLU`` called after each of the four Linears (the
   logits too), batch 64, SGD: ``relu_zeros``; the active probes that apply to it attached but not due (each
   available active probe is tried at attach; ``pathgram`` is left out, since this chain ends in a gate and the
   path gram needs a Linear output layer: the reason is printed); the same MLP without the ReLU on the logits
   (its chain ends in a Linear) with every active probe that applies to it, ``pathgram`` included, not due;
   the MLP written with ``F.relu`` in ``forward``, plain and with ``relu_zeros`` (the TorchFunctionMode that
   catches functional calls). Not-due rows carry the not-due goal (<= 1.01x).

On a machine with CUDA the same rows are measured again on the GPU (``torch.cuda.synchronize`` before starting
and before stopping the clock) and printed as a second table.

    python benchmarks/overhead.py            # 41 rounds, blocks of about 60 ms per case
    python benchmarks/overhead.py --quick    # 21 rounds, blocks of about 25 ms (a minute or two)
    python benchmarks/overhead.py --smoke    # 1 round of 1 step per case, small ResNet/GPT-2 batches (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _resnet import ResNet18  # noqa: E402
from _timing import Case, paired_ratios, rotated_rounds  # noqa: E402

import probes  # noqa: E402

#: the issue's goals (ratio to the plain step)
PASSIVE_MLP_GOAL = 1.15
NOT_ATTACHED_GOAL = 1.01
PASSIVE_LARGE_GOAL = 1.02
NOT_DUE_GOAL = 1.01
GPT2_VOCAB = 1024
ALIGNMENT_EVERY = 50
NEVER = 10**9


class SeedMLP(nn.Module):
    """The seed-003 net: one shared nn.ReLU applied after each of the four Linears (logits too, unless
    ``relu_logits=False``); ``functional=True`` calls ``F.relu`` in ``forward`` instead of the module."""

    def __init__(self, sizes=(784, 750, 320, 50, 10), functional: bool = False, relu_logits: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = nn.ReLU()
        self.functional = functional
        self.relu_logits = relu_logits

    def forward(self, x):
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last or self.relu_logits:
                x = F.relu(x) if self.functional else self.act(x)
        return x


def deep_mlp(blocks: int = 24, width: int = 64) -> nn.Sequential:
    """``blocks`` x (Linear(width, width), LayerNorm, ReLU) in one flat Sequential (3 * blocks + 1 modules)."""
    return nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU())])


class Trainer:
    """One model's training step; ``session`` (when attached) steps with it."""

    def __init__(
        self,
        model: nn.Module,
        batch: tuple,
        loss: Callable[..., torch.Tensor],
        opt: type[torch.optim.Optimizer] = torch.optim.SGD,
        lr: float = 0.01,
    ) -> None:
        self.model, self.batch, self.loss = model, batch, loss
        self.opt = opt(model.parameters(), lr=lr)
        self.session: Any = None

    def step(self) -> None:
        self.loss(self.model, *self.batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.session is not None:
            self.session.step()

    def plain(self) -> Case:
        return Case(self.step, enter=self.step)

    def _attach(self, spec: dict, kw: dict) -> None:
        self.session = probes.attach(self.model, spec, sinks=["memory"], **kw)
        self.step()

    def _detach(self) -> None:
        session, self.session = self.session, None
        session.detach()

    def attached(self, spec: dict, **kw: Any) -> Case:
        """This model's step with ``spec`` attached to it (attached and detached around each block)."""
        return Case(self.step, enter=lambda: self._attach(spec, kw), leave=self._detach)

    def kept(self, spec: dict, warm: int = 20, **kw: Any) -> Case:
        """This model's step with ``spec`` attached once for the whole run (steady state: probes that attach no hook,
        i.e. active probes between their measurements, cost ``session.step()`` alone, without the first steps
        after an attach); its plain blocks run the same model with the session attached but not stepped."""
        held: dict[str, Any] = {}

        def enter() -> None:
            if "session" not in held:
                held["session"] = probes.attach(self.model, spec, sinks=["memory"], **kw)
                self.session = held["session"]
                for _ in range(warm):
                    self.step()
            self.session = held["session"]

        def leave() -> None:
            self.session = None

        return Case(self.step, enter=enter, leave=leave)

    def beside(self, other: Trainer, spec: dict) -> Case:
        """This model's step while ``other`` (another model) is attached with ``spec`` and has stepped."""

        def enter() -> None:
            other._attach(spec, {})
            self.step()

        return Case(self.step, enter=enter, leave=other._detach)

    def site_calls(self, sites: str = "relu") -> int:
        """Activation calls of one training forward, as ``relu_zeros`` reports them (one record per site call)."""
        s = probes.attach(self.model, {"relu_zeros": {"every": NEVER, "sites": sites}}, sinks=["memory"])
        try:
            self.loss(self.model, *self.batch).backward()
            self.opt.zero_grad(set_to_none=True)
            s.flush()
            return sum(1 for tag in s.memory.scalars() if tag.endswith("/zeros"))
        finally:
            s.detach()


@dataclass
class Row:
    name: str
    case: Case | None
    anchor: str | None = None  # the plain row this one is a ratio of (None: this row is a plain step)
    goal: float | None = None
    sites: int | None = None  # site calls per step (None: not applicable)
    skipped: str | None = None


@dataclass
class Section:
    title: str
    rows: list[Row]
    estimate: Callable[[], None] | None = None  # a plain step, to size the blocks
    max_repeat: int | None = None
    notes: list[str] | None = None


def mlp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def applicable(model: nn.Module, probe_data: tuple) -> tuple[list[str], dict[str, str]]:
    """The available active probes that attach to ``model`` (and why each other one does not)."""
    kept, left_out = [], {}
    for info in probes.available():
        if getattr(info.cls, "passive", False):
            continue
        try:
            s = probes.attach(
                model, {info.name: {"every": NEVER}}, probe_data=probe_data, sinks=["memory"], measure_at_attach=False
            )
        except Exception as e:  # noqa: BLE001 - a probe that does not apply says why
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            left_out[info.name] = why if len(why) <= 160 else why[:157] + "..."
        else:
            s.detach()
            kept.append(info.name)
    return kept, left_out


def deep_section(dev: torch.device, smoke: bool) -> Section:
    torch.manual_seed(0)
    batch = (torch.randn(32, 64, device=dev), torch.randint(0, 10, (32,), device=dev))
    probe_data = (torch.randn(64, 64, device=dev), torch.arange(64, device=dev) % 10)
    student, teacher = Trainer(deep_mlp().to(dev), batch, mlp_loss), Trainer(deep_mlp().to(dev), batch, mlp_loss)
    n = student.site_calls()
    rz = {"relu_zeros": {"every": 100}}
    rows = [
        Row("24-block MLP: plain step", student.plain()),
        Row("24-block MLP: relu_zeros", student.attached(rz), "24-block MLP: plain step", PASSIVE_MLP_GOAL, n),
        Row(
            "24-block MLP: alignment, between measurements",
            student.kept({"alignment": {"every": NEVER}}, probe_data=probe_data, measure_at_attach=False),
            "24-block MLP: plain step",
            NOT_DUE_GOAL,
        ),
        Row("second MLP, not attached: plain step", teacher.plain()),
        Row(
            "second MLP, not attached, first attached",
            teacher.beside(student, rz),
            "second MLP, not attached: plain step",
            NOT_ATTACHED_GOAL,
            teacher.site_calls(),
        ),
    ]
    # relu_zeros' flush (one host copy of the counts and the records), once per 100 steps: outside the blocks
    s = probes.attach(student.model, rz, sinks=["memory"])
    flushes = []
    for _ in range(1 if smoke else 7):
        student.step()
        sync(dev)
        t0 = time.perf_counter()
        s.flush()
        flushes.append(time.perf_counter() - t0)
    s.detach()
    flush = statistics.median(flushes)
    note = (
        f"relu_zeros flush on the 24-block MLP ({n} sites): {flush * 1e3:.2f} ms, every 100 steps: "
        f"+{flush / 100 * 1e6:.1f} us per step (not in the blocks)"
    )
    return Section(
        f"24-block Linear(64,64)-LayerNorm-ReLU MLP ({len(list(student.model.modules()))} modules), batch 32, SGD",
        rows,
        student.step,
        max_repeat=ALIGNMENT_EVERY - 10,
        notes=[note],
    )


def gpt2_section(dev: torch.device, smoke: bool) -> Section:
    names = ("GPT-2: plain step", "GPT-2: relu_zeros sites=all")
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        reason = f"skipped: transformers is not installed ({e})"
        return Section("GPT-2", [Row(n, None, skipped=reason) for n in names])
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=4, n_embd=128, n_head=4, n_positions=64, vocab_size=GPT2_VOCAB, bos_token_id=0, eos_token_id=0
    )
    b = 2 if smoke else 8
    lm = Trainer(
        GPT2LMHeadModel(cfg).to(dev),
        (torch.randint(0, GPT2_VOCAB, (b, 64), device=dev),),
        lm_loss,
        torch.optim.AdamW,
        lr=1e-4,
    )
    rows = [
        Row(names[0], lm.plain()),
        Row(
            names[1],
            lm.attached({"relu_zeros": {"every": 100, "sites": "all"}}),
            names[0],
            PASSIVE_LARGE_GOAL,
            lm.site_calls("all"),
        ),
    ]
    return Section(
        f"GPT-2 from GPT2Config: 4 layers, width 128, 4 heads, vocabulary {GPT2_VOCAB}, sequence 64, batch {b}, AdamW",
        rows,
        lm.step,
    )


def resnet_section(dev: torch.device, smoke: bool, quick: bool) -> Section:
    torch.manual_seed(0)
    w, b = (8, 2) if smoke else (64, 4 if quick else 8)
    batch = (torch.randn(b, 3, 32, 32, device=dev), torch.randint(0, 10, (b,), device=dev))
    net = Trainer(ResNet18(w).to(dev), batch, mlp_loss)
    rows = [
        Row("ResNet-18: plain step", net.plain()),
        Row(
            "ResNet-18: relu_zeros",
            net.attached({"relu_zeros": {"every": 100}}),
            "ResNet-18: plain step",
            PASSIVE_LARGE_GOAL,
            net.site_calls(),
        ),
    ]
    return Section(f"CIFAR ResNet-18, width {w}, batch {b}, SGD", rows, net.step)


def seed_section(dev: torch.device) -> Section:
    torch.manual_seed(0)
    batch = (torch.randn(64, 784, device=dev), torch.randint(0, 10, (64,), device=dev))
    probe_data = (torch.randn(64, 784, device=dev), torch.arange(64, device=dev) % 10)

    def trainer(**kw: Any) -> Trainer:
        torch.manual_seed(1)
        return Trainer(SeedMLP(**kw).to(dev), batch, mlp_loss)

    shared, linear, func = trainer(), trainer(relu_logits=False), trainer(functional=True)
    rz = {"relu_zeros": {"every": 100}}
    active, left_out = applicable(shared.model, probe_data)
    active_lin, left_out_lin = applicable(linear.model, probe_data)
    idle = {n: {"every": NEVER} for n in active}
    idle_lin = {n: {"every": NEVER} for n in active_lin}
    plain, plain_lin, plain_f = (
        "seed MLP: plain step",
        "seed MLP, Linear output: plain step",
        "F.relu seed MLP: plain step",
    )
    rows = [
        Row(plain, shared.plain()),
        Row("seed MLP: relu_zeros", shared.attached(rz), plain, None, shared.site_calls()),
        Row(
            "seed MLP: active probes, not due",
            shared.kept(idle, probe_data=probe_data, measure_at_attach=False) if active else None,
            plain,
            NOT_DUE_GOAL,
            skipped=None if active else "skipped: no active probe applies",
        ),
        Row(plain_lin, linear.plain()),
        Row(
            "seed MLP, Linear output: active probes, not due",
            linear.kept(idle_lin, probe_data=probe_data, measure_at_attach=False) if active_lin else None,
            plain_lin,
            NOT_DUE_GOAL,
            skipped=None if active_lin else "skipped: no active probe applies",
        ),
        Row(plain_f, func.plain()),
        Row("F.relu seed MLP: relu_zeros", func.attached(rz), plain_f, None, func.site_calls()),
    ]
    notes = [f"seed MLP, not due: {', '.join(active) or '(none)'}"]
    notes += [f"  left out {name}: {why}" for name, why in left_out.items()]
    notes.append(f"seed MLP with a Linear output layer, not due: {', '.join(active_lin) or '(none)'}")
    notes += [f"  left out {name}: {why}" for name, why in left_out_lin.items()]
    return Section(
        "seed 003: 784-750-320-50-10 MLP, one shared nn.ReLU (after the logits too), batch 64, SGD",
        rows,
        shared.step,
        notes=notes,
    )


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(section: Section, dev: torch.device, rounds: int, block_s: float, warmup: int, smoke: bool) -> dict:
    """Times and paired ratios of a section's rows: ``{row: (seconds, ratio)}``."""
    live = {r.name: r.case for r in section.rows if r.case is not None}
    if not live:
        return {}
    if smoke:
        repeat = 1
    else:
        section.estimate()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(3):
            section.estimate()
        sync(dev)
        repeat = max(1, round(block_s / ((time.perf_counter() - t0) / 3)))
    if section.max_repeat is not None:
        repeat = min(repeat, section.max_repeat)
    measured = rotated_rounds(
        live, rounds=rounds, repeat=repeat, warmup=warmup, sync=(lambda: sync(dev)) if dev.type == "cuda" else None
    )
    section.title += f"; blocks of {repeat} step{'s' * (repeat > 1)}"
    out = {}
    for r in section.rows:
        if r.case is None:
            continue
        ratio = paired_ratios(measured, r.anchor)[r.name] if r.anchor else 1.0
        out[r.name] = (statistics.median(measured[r.name]), ratio)
    return out


def report(sections: list[Section], results: list[dict], title: str) -> str:
    width = max(len(r.name) for s in sections for r in s.rows)
    head = (
        f"{'case':<{width}}  {'step (ms)':>9}  {'ratio':>7}  {'extra/step (us)':>15}  {'site calls':>10}  "
        f"{'us/site call':>12}  {'goal':>8}  meets"
    )
    lines = [title, head, "-" * len(head)]
    for section, res in zip(sections, results):
        lines.append(f"[{section.title}]")
        for r in section.rows:
            if r.name not in res:
                lines.append(f"{r.name:<{width}}  {r.skipped or 'skipped'}")
                continue
            t, ratio = res[r.name]
            goal = f"<= {r.goal:.2f}x" if r.goal is not None else "-"
            meets = "-" if r.goal is None else ("yes" if ratio <= r.goal else "no")
            if r.anchor is None:
                lines.append(f"{r.name:<{width}}  {t * 1e3:>9.3f}  {'1.000x':>7}  {'(plain)':>15}")
                continue
            extra = (ratio - 1.0) * res[r.anchor][0]
            per_call = f"{extra / r.sites * 1e6:>12.2f}" if r.sites else f"{'-':>12}"
            sites = f"{r.sites:>10d}" if r.sites is not None else f"{'-':>10}"
            lines.append(
                f"{r.name:<{width}}  {t * 1e3:>9.3f}  {ratio:>6.3f}x  {extra * 1e6:>+15.1f}  {sites}  "
                f"{per_call}  {goal:>8}  {meets}"
            )
        lines += [f"  {n}" for n in (section.notes or [])]
    return "\n".join(lines)


def run_device(dev: torch.device, args: argparse.Namespace) -> dict[str, float]:
    smoke, quick = args.smoke, args.quick
    rounds, block_s, warmup = (1, 0.0, 0) if smoke else ((21, 0.025, 1) if quick else (41, 0.06, 2))
    if args.rounds:
        rounds = args.rounds
    sections = [
        deep_section(dev, smoke),
        gpt2_section(dev, smoke),
        resnet_section(dev, smoke, quick),
        seed_section(dev),
    ]
    results = [measure(s, dev, rounds, block_s, warmup, smoke) for s in sections]
    where = f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else dev.type
    title = (
        f"training-step overhead on {where}, {torch.get_num_threads()} thread(s), {rounds} interleaved "
        "round(s); ratio: median of the per-round ratios to the plain step of the same model; goals are "
        "reported, not enforced"
    )
    print(report(sections, results, title), flush=True)
    return {name: ratio for res in results for name, (_, ratio) in res.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="21 rounds of ~25 ms blocks (a minute or two)")
    mode.add_argument("--smoke", action="store_true", help="one step per case: proves every row runs (seconds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: by mode)")
    ap.add_argument("--no-cuda", action="store_true", help="CPU only, even where CUDA is available")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(torch.device("cuda"))
    out = {}
    for dev in devices:
        out[dev.type] = run_device(dev, args)
        print()
    return out


if __name__ == "__main__":
    main()
