"""
Where a layer's gradient scale comes from: the residual stream's size after each block, and each adapted
layer's input size and output gradient, for one batch of a GLUE task at the start of fine-tuning (CPU, under a
minute for SmolLM2-135M). The demand (dynlora.py) is whitened by each probe row's input power, so the input's
scale cancels; the output gradient's does not. Its square is what the demand reads across layers.

    python results/gradscale.py --init ~/.cache/dynlora/SmolLM2-135M-Instruct.Q4_1.gguf --data-dir ../shared/glue
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train  # noqa: E402
from model import GPT  # noqa: E402

KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def measure(gpt, layers, idx, lengths, y):
    """(residual-stream rms after each block, {layer: rms of its input}, {layer: |dL/dy| over the batch})."""
    stream, outs, ins, hooks = [], {}, {}, []
    for block in gpt.transformer.h:
        hooks.append(block.register_forward_hook(
            lambda m, i, o: stream.append(o.detach().float().pow(2).mean().sqrt().item())))
    for name, layer in layers.items():
        def keep(m, i, o, name=name):
            o.retain_grad()
            outs[name], ins[name] = o, i[0].detach().float().pow(2).mean().sqrt().item()
        hooks.append(layer.register_forward_hook(keep))
    F.cross_entropy(gpt(idx, lengths).float(), y).backward()
    for h in hooks:
        h.remove()
    return stream, ins, {n: o.grad.float().norm().item() for n, o in outs.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the backbone, as train.py --init")
    p.add_argument("--data-dir", default=train.p.get_default("data_dir"), help="GLUE folder, as train.py --data-dir")
    p.add_argument("--task", default="sst2", choices=data.TASKS, help="a GLUE task")
    p.add_argument("--batch-size", type=int, default=32, help="examples in the batch")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    task = data.TASKS[args.task]
    gpt = GPT.from_pretrained(args.init, n_labels=task.n_labels)
    layers, _ = train.setup_method(gpt, "dynlora")
    train_ex, _ = data.load_task(args.task, args.data_dir, 0, False)
    enc = data.encode_split(train_ex[: 4 * args.batch_size], data.get_tokenizer(args.init), 128)
    idx, lengths, y, _ = next(data.iterate_batches(enc, args.batch_size, shuffle=True, seed=0, epoch=0))
    stream, ins, grads = measure(gpt, layers, idx, lengths, y)
    print("residual stream rms after block 0, 1, ...: " + " ".join(f"{s:.0f}" for s in stream))
    for kind in KINDS:
        names = [n for n in layers if n.endswith(kind)]
        print(f"{kind:12s} |dL/dy|   " + " ".join(f"{grads[n]:.0e}" for n in names))
        print(f"{kind:12s} input rms " + " ".join(f"{ins[n]:.2f}" for n in names))


if __name__ == "__main__":
    main()
