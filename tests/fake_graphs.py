"""CUDA graphs faked on CPU, so that CI can run the Python side of train.py's recorded steps: what capture_steps
records, what it puts back, and under torchrun the order of DDP, warm-up and recording on every process.

    python tests/fake_graphs.py TRAIN_ARGS --cuda-graphs                  # train.py with the graphs faked
    torchrun --nproc_per_node=2 tests/fake_graphs.py TRAIN_ARGS --cuda-graphs

A fake graph keeps the step that was recorded inside it and runs it again on each replay, writing into the
tensor the recording returned, as a real replay would. Streams do nothing: on CPU everything runs in order."""
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import graphs  # noqa: E402
import train  # noqa: E402


class FakeGraph:
    """Stands in for a recorded torch.cuda.CUDAGraph. A real replay reads every tensor where it lay when recorded,
    so each replay checks that the tensors in `watched()` are still the same objects (a learning rate or optimizer
    state replaced rather than updated in place would be missed by a real graph)."""
    watched = staticmethod(lambda: [])
    replays = 0

    def __init__(self, fn):
        self.fn, self.out = fn, fn()
        self.ids = [id(t) for t in FakeGraph.watched()]

    def replay(self):
        assert [id(t) for t in FakeGraph.watched()] == self.ids, "a tensor the recording read was replaced"
        self.out.copy_(self.fn())
        FakeGraph.replays += 1


def record(step_fn, inputs, stream):
    """graphs.record, faked: the step runs once now, and again on each replay, on the same input tensors."""
    idx, lengths, y, lr = inputs
    graph = FakeGraph(lambda: step_fn([(idx, lengths, y)], lr))
    return graph, graph.out


class Stream:
    def wait_stream(self, other):
        pass


def install(setattr=setattr):
    """Put the fakes in place: pass pytest's monkeypatch.setattr to have them undone after a test."""
    setattr(torch.cuda, "Stream", Stream)
    setattr(torch.cuda, "current_stream", lambda: Stream())
    setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    setattr(graphs, "record", record)
    setattr(graphs, "can_record", lambda device: True)


if __name__ == "__main__":
    install()
    train.main(sys.argv[1:])
    print(f"fake graphs replayed: {FakeGraph.replays}", file=sys.stderr)  # stdout ends in train.py's JSON
