"""A small GPT-2 causal language model under the Hugging Face ``Trainer``, with every probe that applies.

The model is ``GPT2LMHeadModel`` from a small config (2 layers, width 32, 2 heads, ReLU MLPs; no weights are
downloaded) trained with ``labels = input_ids`` (the model's own shifted next-token loss) on generated text: each
sequence is either a random motif of 2 to 4 tokens repeated, or a counting run ``a, a+s, a+2s, ...`` (mod the
vocabulary) with a step ``s`` of 1 to 3. After its first few tokens every sequence is predictable, so the loss
falls from ``log(vocab)`` towards the cost of those first tokens, and the features have something to align with.

One callback, ``ProbesCallback("auto", probe_data=...)``, attaches every built-in probe that applies to the model
(the callback says in one line each which it left out and why) on a fixed probe batch of held-out sequences, at the
default cadences scaled to the run's length (about 10 points per probe; said in one line). The callback sees a
causal LM and sets ``label_shift=1``: the token labels ``(P, T)`` pair the features at position ``t`` with the token
at ``t + 1``, as the loss does; ``ntk`` keeps the token labels too (it leaves out only ``ntk/alignment``, which needs
one label per sequence) and takes the kernel of the last position's logits. The Trainer's ``train/loss`` and the
probe tags share one TensorBoard run, and a PNG shows the loss, the alignment of each block's features (and of the
logits) with the next token, the fraction of ReLU units at zero per block and the NTK's distance from its initial
kernel.

    python examples/gpt2_trainer.py --smoke    # seconds (the tests)
    python examples/gpt2_trainer.py --quick    # a minute or two on 2 cores
    python examples/gpt2_trainer.py            # 1,000 steps: about three times --quick
    tensorboard --logdir runs/gpt2_trainer
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="seconds: a tiny run for the tests")
    p.add_argument("--quick", action="store_true", help="a shorter run (a minute or two on 2 cores)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--seq", type=int, default=24, help="tokens per sequence")
    p.add_argument("--train", type=int, default=4096, help="training sequences")
    p.add_argument("--probe", type=int, default=16, help="sequences in the probe batch")
    p.add_argument("--every", type=int, default=None, help="loss logging cadence in steps (default steps/20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default="runs/gpt2_trainer")
    p.add_argument("--out", default=None, help="PNG path (default <logdir>/gpt2_trainer.png)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.train, args.probe, args.batch, args.every = 4, 64, 8, 16, 2
    elif args.quick:
        args.steps = min(args.steps, 300)
    if args.every is None:
        args.every = max(1, args.steps // 20)
    return args


def make_text(n: int, vocab: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` generated sequences of ``seq`` token ids in ``[0, vocab)``: repeated motifs and counting runs."""
    g = generator
    out = torch.empty(n, seq, dtype=torch.long)
    kind = torch.randint(0, 2, (n,), generator=g)
    t = torch.arange(seq)
    for i in range(n):
        if kind[i] == 0:  # a motif of 2-4 tokens, repeated
            k = int(torch.randint(2, 5, (1,), generator=g))
            motif = torch.randint(0, vocab, (k,), generator=g)
            out[i] = motif[t % k]
        else:  # a counting run a, a+s, a+2s, ... mod vocab
            a = int(torch.randint(0, vocab, (1,), generator=g))
            s = int(torch.randint(1, 4, (1,), generator=g))
            out[i] = (a + s * t) % vocab
    return out


class Texts(torch.utils.data.Dataset):
    """Token sequences as the Trainer takes them: ``{"input_ids", "labels"}`` with ``labels = input_ids``."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@contextlib.contextmanager
def tensorboard_dir(path: Path) -> Iterator[None]:
    """The Trainer's ``TensorBoardCallback`` writes to ``$TENSORBOARD_LOGGING_DIR`` (transformers 5 has no
    ``logging_dir`` argument; the callback reads it when the Trainer is made): set it while the Trainer is made and
    trains, so the loss lands in the probes' run."""
    old = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = old


def train(args: argparse.Namespace, logdir: Path) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from probes.integrations.transformers import ProbesCallback

    g = torch.Generator().manual_seed(args.seed)
    train_ids = make_text(args.train, args.vocab, args.seq, g)
    probe_ids = make_text(args.probe, args.vocab, args.seq, g)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=args.vocab,
            n_positions=args.seq,
            n_embd=32,
            n_layer=2,
            n_head=2,
            activation_function="relu",
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    training = TrainingArguments(
        output_dir=str(logdir / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=args.every,
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # the probe batch: held-out sequences, a dict batch with its token labels (P, T) inside. "auto" attaches every
    # probe that applies to a GPT-2 with token labels: relu_zeros (passive, on the Trainer's forwards), patterns
    # (the ReLU gates), alignment and margin (each kept position a sample, paired with the next token), and ntk
    # (the kernel of the last position's logits, vocab outputs per sequence; ntk/alignment is left out, as it needs
    # one label per sequence). Of the rest, particles needs a two-layer net, and linear_region and pathgram a
    # tensor input (attach("auto") says so, one line each). The memory sink keeps the series for the PNG, logdir
    # is the run the Trainer writes train/loss into.
    probe_batch = {"input_ids": probe_ids, "labels": probe_ids.clone()}
    callback = ProbesCallback("auto", probe_data=probe_batch, logdir=str(logdir), sinks=["memory"], strict=args.smoke)
    with tensorboard_dir(logdir), warnings.catch_warnings():
        trainer = Trainer(model=model, args=training, train_dataset=Texts(train_ids), callbacks=[callback])
        warnings.filterwarnings("ignore", message=".*was not found in model parameters.*")
        trainer.train()
    session = callback.session
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    callbacks = sum(isinstance(c, ProbesCallback) for c in trainer.callback_handler.callbacks)
    return {
        "probes": sorted(session.probes),
        "loss": losses,
        "scalars": session.memory.scalars(),
        "failures": dict(session.failures),
        "callbacks": callbacks,
    }


def plot(result: dict, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["scalars"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    if result["loss"]:
        axes[0].plot(*zip(*result["loss"]), label="train/loss")
    axes[0].axhline(math.log(args.vocab), color="gray", ls=":", label=f"log(vocab) = {math.log(args.vocab):.2f}")
    axes[0].set_title("training loss (next token)")
    for tag in sorted(t for t in s if t.startswith("alignment/") and t.endswith("/cka")):
        axes[1].plot(*zip(*s[tag]), marker=".", label=tag[len("alignment/") : -len("/cka")])
    axes[1].set_title("alignment with the next token (cka)")
    for tag in sorted(t for t in s if t.startswith("relu_zeros/") and t.endswith("/fraction") and "total" not in t):
        axes[2].plot(*zip(*s[tag]), marker=".", label=tag[len("relu_zeros/") :])
    axes[2].set_title("ReLU units at zero")
    if "ntk/distance_from_init" in s:
        axes[3].plot(*zip(*s["ntk/distance_from_init"]), marker=".", label="ntk/distance_from_init")
    if "margin/n_delta_fraction" in s:
        axes[3].plot(*zip(*s["margin/n_delta_fraction"]), marker=".", label="margin/n_delta_fraction")
    axes[3].set_title("NTK distance from init; tokens not fitted")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"GPT-2 (2 layers, width 32, ReLU) on generated text, vocab {args.vocab}, {args.seq} tokens, "
        f"batch {args.batch}, {args.steps} steps, probe batch {args.probe} sequences"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse(argv)
    logdir = Path(args.logdir)
    t0 = time.perf_counter()
    result = train(args, logdir)
    s = result["scalars"]
    out = Path(args.out) if args.out else logdir / "gpt2_trainer.png"
    plot(result, out, args)
    seconds = time.perf_counter() - t0
    loss = result["loss"]
    align = s.get("alignment/output/cka", [])
    print(
        f"loss {loss[0][1]:.3f} (step {loss[0][0]}) -> {loss[-1][1]:.3f} (step {loss[-1][0]}); "
        f"output alignment {align[0][1]:.3f} -> {align[-1][1]:.3f}"
        if loss and align
        else "no loss logged"
    )
    print(f"{seconds:.1f} s; probes: {', '.join(result['probes'])}; TensorBoard run {logdir}; figure {out}")
    return {
        "png": str(out),
        "logdir": str(logdir),
        "loss": loss,
        "scalars": s,
        "probes": result["probes"],
        "failures": result["failures"],
        "callbacks": result["callbacks"],
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
