#!/usr/bin/env python3
"""Train a LoRA on a toy MLP through lycoris-server, with nothing but numpy.

The client owns the model: it decides the data, the nonlinearities and the loss. The
server owns the adapters: their parameters, the forward and backward math of each adapted
layer, the gradients and the optimizer. They talk JSON-RPC 2.0, one JSON object per line
(NDJSON) on the server's stdin/stdout; tensors do not travel inside the JSON but in a
shared-memory "arena" file that both processes map, and the JSON only says where they are:

    {"dtype": "F32", "shape": [64, 16], "offset": 4096}

The protocol steps, in order:

    initialize          handshake: server name, version, capabilities
    arena.create        the server creates the shared file; we mmap it
    network.create      one LoRA module per Linear layer, given its base weight and bias
    network.set_training
    optimizer.create    AdamW, living in the server
    loop: forward (per layer, "full": true)  ->  numpy tanh / MSE  ->  backward (per layer,
          in reverse)  ->  optimizer.step
    network.save        a kohya/LyCORIS-style .safetensors file with metadata
    shutdown

Run:  python3 examples/train_lora_numpy.py --steps 200 --out /tmp/toy-lora.safetensors
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

# The toy model: Linear(16→32) → tanh → Linear(32→32) → tanh → Linear(32→8).
# Module names follow LyCORIS's own naming (prefix "lycoris_" + the torch attribute path,
# dots turned into underscores), so the saved file loads onto a torch model with
# attributes fc1, fc2, fc3 via lycoris.create_lycoris_from_weights.
LAYER_NAMES = ["lycoris_fc1", "lycoris_fc2", "lycoris_fc3"]
LAYER_SIZES = [16, 32, 32, 8]


# --------------------------------------------------------------------------------------
# Talking to the server
# --------------------------------------------------------------------------------------

def find_server() -> str:
    """The lycoris-server binary: $LYCORIS_SERVER, else the repo's release, else debug build."""
    from_env = os.environ.get("LYCORIS_SERVER")
    if from_env:
        if not os.access(from_env, os.X_OK):
            sys.exit(f"error: LYCORIS_SERVER={from_env} is not an executable file")
        return from_env
    for build in ("release", "debug"):
        candidate = REPO_ROOT / ".build" / build / "lycoris-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    sys.exit("error: no lycoris-server binary found. Build it (swift build) or point "
             "LYCORIS_SERVER at one; looked in .build/release and .build/debug under "
             f"{REPO_ROOT}")


class RPCError(Exception):
    """A JSON-RPC error response: code, message and optional data from the server."""

    def __init__(self, method: str, error: dict):
        self.code = error.get("code")
        self.data = error.get("data")
        super().__init__(f"{method} failed ({self.code}): {error.get('message')}"
                         + (f" {json.dumps(self.data)}" if self.data else ""))


class LycorisClient:
    """One server process, spoken to in NDJSON: a request line out, a response line back."""

    def __init__(self, binary: str):
        env = dict(os.environ)
        env.setdefault("LYCORIS_LOG_LEVEL", "warning")  # the server logs to stderr
        # stdout is opened as a buffered binary reader, so readline() pulls the reply in
        # large chunks instead of one byte per system call.
        self.process = subprocess.Popen([binary], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        self.next_id = 0

    def call(self, method: str, params: dict | None = None):
        """Sends one request and returns its `result`, or raises RPCError."""
        self.next_id += 1
        request = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            request["params"] = params
        self.process.stdin.write(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait(timeout=5)
            raise RuntimeError(f"lycoris-server exited (status {code}) during {method}")
        response = json.loads(line)
        if response.get("id") != self.next_id:
            raise RuntimeError(f"response id {response.get('id')} does not answer request {self.next_id}")
        if "error" in response:
            raise RPCError(method, response["error"])
        return response["result"]

    def close(self):
        """`shutdown` makes the server release the arena (unlinking its file) and exit."""
        try:
            if self.process.poll() is None:
                self.call("shutdown")
            self.process.stdin.close()
        except (OSError, RuntimeError, RPCError):
            pass  # the server is gone already; nothing left to release
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --------------------------------------------------------------------------------------
# Tensors: the shared-memory arena, and base64 for one-off tensors
# --------------------------------------------------------------------------------------

class Slot:
    """A float32 tensor living in the arena: a numpy view plus its byte offset."""

    def __init__(self, array: np.ndarray, offset: int):
        self.array = array
        self.offset = offset

    @property
    def desc(self) -> dict:
        """Descriptor of an input: the server reads the elements at `offset`."""
        return {"dtype": "F32", "shape": list(self.array.shape), "offset": self.offset}

    @property
    def out(self) -> dict:
        """Output spec: the server writes its result at `offset` (shape must fit)."""
        return {"dtype": "F32", "offset": self.offset}


class Arena:
    """The arena file mapped here with mmap, carved into slots by a bump allocator.

    Both processes map the same file MAP_SHARED, so a numpy write here is what the server
    reads, and what the server writes at an offset we chose appears in our numpy view.
    """

    ALIGN = 64

    def __init__(self, path: str, size: int):
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping stays valid without the descriptor
        self.size = size
        self.used = 0

    def alloc(self, *shape: int) -> Slot:
        offset = -(-self.used // self.ALIGN) * self.ALIGN  # round up to the alignment
        nbytes = int(np.prod(shape)) * 4
        if offset + nbytes > self.size:
            raise MemoryError(f"arena of {self.size} bytes is full")
        self.used = offset + nbytes
        return Slot(np.ndarray(shape, dtype=np.float32, buffer=self.map, offset=offset), offset)


def inline_tensor(array: np.ndarray) -> dict:
    """A tensor carried inside the JSON as base64 (little-endian F32): handy for things
    sent once, such as base weights, and for clients that cannot map memory."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "F32", "shape": list(data.shape), "data": base64.b64encode(data.tobytes()).decode()}


def arena_bytes_needed(*batches: int) -> int:
    """Bytes for one TrainingBuffers per batch size, alignment padding included."""
    pairs = list(zip(LAYER_SIZES, LAYER_SIZES[1:]))
    floats_per_row = (LAYER_SIZES[0]                                # the input
                      + sum(2 * out + inp for inp, out in pairs)    # output, its grad, input grad
                      + sum(LAYER_SIZES[1:-1]))                     # tanh activations
    slots_per_buffer = 1 + 3 * len(pairs) + len(pairs) - 1
    return sum(4 * floats_per_row * b + Arena.ALIGN * slots_per_buffer for b in batches)


# --------------------------------------------------------------------------------------
# The toy problem
# --------------------------------------------------------------------------------------

def make_toy_problem(seed: int, teacher_rank: int = 2):
    """Base weights of the MLP, and the hidden "teacher": the same MLP whose weights moved
    by a low-rank change. The LoRA must learn that change from input/output pairs alone.
    Weights are (out_features, in_features), as torch.nn.Linear stores them."""
    rng = np.random.default_rng(seed)
    base, teacher = [], []
    for fan_in, fan_out in zip(LAYER_SIZES, LAYER_SIZES[1:]):
        weight = rng.normal(0, 1 / math.sqrt(fan_in), (fan_out, fan_in)).astype(np.float32)
        bias = rng.normal(0, 0.1, fan_out).astype(np.float32)
        up = rng.normal(0, 1, (fan_out, teacher_rank))
        down = rng.normal(0, 1 / math.sqrt(fan_in), (teacher_rank, fan_in))
        change = (0.5 / math.sqrt(teacher_rank) * up @ down).astype(np.float32)
        base.append((weight, bias))
        teacher.append((weight + change, bias))
    return base, teacher


def mlp(layers, x: np.ndarray) -> np.ndarray:
    """The model computed locally (used for the teacher's targets only)."""
    for index, (weight, bias) in enumerate(layers):
        x = x @ weight.T + bias
        if index < len(layers) - 1:
            x = np.tanh(x)
    return x


# --------------------------------------------------------------------------------------
# Forward and backward through the server
# --------------------------------------------------------------------------------------

class TrainingBuffers:
    """The arena slots of one batch size: the input, then per layer its output (pre-
    activation), the gradient of that output, the gradient of its input, and the tanh
    activation that feeds the next layer."""

    def __init__(self, arena: Arena, batch: int):
        self.x = arena.alloc(batch, LAYER_SIZES[0])
        pairs = list(zip(LAYER_SIZES, LAYER_SIZES[1:]))
        self.out = [arena.alloc(batch, o) for _, o in pairs]
        self.grad_out = [arena.alloc(batch, o) for _, o in pairs]
        self.grad_in = [arena.alloc(batch, i) for i, _ in pairs]
        self.act = [arena.alloc(batch, o) for _, o in pairs[:-1]]

    def layer_input(self, index: int) -> Slot:
        return self.x if index == 0 else self.act[index - 1]


def model_forward(client: LycorisClient, buf: TrainingBuffers, keep_tapes: bool) -> list[int]:
    """Runs the adapted MLP on buf.x; the prediction ends up in buf.out[-1].array.

    One `forward` request per layer, because each layer's input is the previous layer's
    output after our tanh. With "full": true the server returns the whole adapted output
    W0·x + b + m·ΔW·x (it has W0 and b from network.create), so the client never does the
    base matmul itself, and backward's grad_input already includes the base path. The
    alternative is "full": false (the adapter's delta only) plus a local x @ W0.T + b.
    Returns the tapes: handles the server keeps until the matching backward."""
    tapes = []
    for index, name in enumerate(LAYER_NAMES):
        result = client.call("forward", {
            "calls": [{"module": name, "input": buf.layer_input(index).desc,
                       "output": buf.out[index].out, "full": True}],
            "grad": keep_tapes,
        })["results"][0]
        if keep_tapes:
            tapes.append(result["tape"])
        if index < len(LAYER_NAMES) - 1:
            np.tanh(buf.out[index].array, out=buf.act[index].array)  # written in the arena
    return tapes


def model_backward(client: LycorisClient, buf: TrainingBuffers, tapes: list[int]) -> None:
    """Back-propagates buf.grad_out[-1] (∂loss/∂prediction, already filled in) through the
    layers in reverse. Each `backward` accumulates the adapter's parameter gradients in
    the server and writes ∂loss/∂input into our grad_in slot; we push that through tanh."""
    for index in reversed(range(len(LAYER_NAMES))):
        client.call("backward", {"calls": [{
            "tape": tapes[index],
            "grad_output": buf.grad_out[index].desc,
            "grad_input": buf.grad_in[index].out,
        }]})
        if index > 0:
            activation = buf.act[index - 1].array
            buf.grad_out[index - 1].array[...] = buf.grad_in[index].array * (1 - activation * activation)


def mse(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((prediction - target) ** 2))


def train_step(client: LycorisClient, buf: TrainingBuffers, target: np.ndarray) -> float:
    """One optimizer step on the batch in buf.x; returns the batch loss."""
    tapes = model_forward(client, buf, keep_tapes=True)
    prediction = buf.out[-1].array
    loss = mse(prediction, target)
    # ∂MSE/∂prediction, written where the last layer's backward reads it.
    buf.grad_out[-1].array[...] = 2 * (prediction - target) / prediction.size
    model_backward(client, buf, tapes)
    # Apply the accumulated gradients (clipped to max_grad_norm) and zero them.
    client.call("optimizer.step", {"zero_grad": True})
    return loss


def evaluate(client: LycorisClient, buf: TrainingBuffers, target: np.ndarray) -> float:
    """The loss on a fixed batch (already in buf.x); no tapes, so nothing to backward."""
    model_forward(client, buf, keep_tapes=False)
    return mse(buf.out[-1].array, target)


# --------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------

def create_network(client: LycorisClient, base, algo: str, rank: int, alpha: float, seed: int) -> dict:
    """One adapter per Linear layer. Base weights and biases travel once, inline in
    base64; the server needs them for "full" outputs (and IA3 needs the weight)."""
    layers = []
    for name, (weight, bias), fan_in, fan_out in zip(LAYER_NAMES, base, LAYER_SIZES, LAYER_SIZES[1:]):
        layers.append({"name": name, "kind": "linear", "in_features": fan_in, "out_features": fan_out,
                       "weight": inline_tensor(weight), "bias": inline_tensor(bias)})
    # Options use LyCORIS's keyword names: lora_dim is the rank, alpha/rank the scale.
    return client.call("network.create", {"layers": layers, "algo": algo, "seed": seed,
                                          "options": {"lora_dim": rank, "alpha": alpha}})


def kohya_metadata(args, info: dict) -> dict:
    """safetensors metadata as kohya's sd-scripts writes it (every value a string)."""
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(args.rank),
        "ss_network_alpha": str(args.alpha),
        "ss_network_args": json.dumps({"algo": args.algo}),
        "ss_learning_rate": str(args.lr),
        "ss_steps": str(args.steps),
        "ss_output_name": Path(args.out).stem,
        "ss_training_comment": "toy MLP trained by examples/train_lora_numpy.py through lycoris-server",
        "ss_num_modules": str(len(info["modules"])),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "toy-lora.safetensors"),
                        help="where network.save writes the adapter (default: %(default)s)")
    parser.add_argument("--algo", default="lora", choices=["lora", "locon", "loha", "lokr"],
                        help="adapter algorithm (lora is saved as LoCon keys; default lora)")
    parser.add_argument("--rank", type=int, default=4, help="lora_dim (default 4)")
    parser.add_argument("--alpha", type=float, default=4.0, help="alpha; scale = alpha/rank (default 4)")
    parser.add_argument("--lr", type=float, default=2e-2, help="AdamW learning rate (default 2e-2)")
    parser.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    parser.add_argument("--log-every", type=int, default=25, help="print the loss every N steps")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    base, teacher = make_toy_problem(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    eval_batch = 256
    eval_x = rng.normal(size=(eval_batch, LAYER_SIZES[0])).astype(np.float32)
    eval_target = mlp(teacher, eval_x)

    client = LycorisClient(find_server())
    try:
        # 1. Handshake. Every other method is refused before it.
        hello = client.call("initialize", {"protocol_version": "1.0", "client": "train_lora_numpy.py"})
        print(f"server: {hello['server']['name']} {hello['server']['version']}, "
              f"algorithms {', '.join(hello['capabilities']['algorithms'])}")

        # 2. The arena: the server creates a file (in /dev/shm) and tells us its path.
        reply = client.call("arena.create", {"size": arena_bytes_needed(args.batch, eval_batch)})
        arena = Arena(reply["path"], reply["size"])
        train_buf = TrainingBuffers(arena, args.batch)
        eval_buf = TrainingBuffers(arena, eval_batch)
        eval_buf.x.array[...] = eval_x

        # 3. The adapters, switched to training mode (forward then keeps tapes by default;
        #    we also say so per request with "grad").
        info = create_network(client, base, args.algo, args.rank, args.alpha, args.seed)
        print(f"network: {len(info['modules'])} {info['modules'][0]['algorithm']} modules, "
              f"{info['parameter_count']} trainable parameters")
        client.call("network.set_training", {"training": True})

        # 4. The optimizer lives in the server and updates the parameters it holds.
        client.call("optimizer.create", {"type": "adamw", "lr": args.lr, "weight_decay": 0.0,
                                         "max_grad_norm": 1.0})

        initial = final = evaluate(client, eval_buf, eval_target)
        print(f"step {0:5d}  train_loss {'-':>10}  val_loss {initial:.6f}")
        started = time.perf_counter()
        window = []
        for step in range(1, args.steps + 1):
            # A fresh batch, written straight into the arena; targets from the teacher.
            train_buf.x.array[...] = rng.normal(size=train_buf.x.array.shape)
            window.append(train_step(client, train_buf, mlp(teacher, train_buf.x.array)))
            if step % args.log_every == 0 or step == args.steps:
                final = evaluate(client, eval_buf, eval_target)
                print(f"step {step:5d}  train_loss {np.mean(window):10.6f}  val_loss {final:.6f}")
                window = []
        elapsed = time.perf_counter() - started
        print(f"val_loss {initial:.6f} -> {final:.6f} ({initial / max(final, 1e-30):.1f}x lower) "
              f"in {args.steps} steps, {elapsed:.1f} s")

        # 5. Save the adapter with kohya-style metadata; the server writes the file.
        saved = client.call("network.save", {"path": os.path.abspath(args.out), "dtype": "F32",
                                             "metadata": kohya_metadata(args, info)})
        print(f"saved {saved['modules']} modules ({saved['bytes']} bytes) to {saved['path']}")

        # Drop our views before unmapping (numpy views pin the mmap).
        del train_buf, eval_buf
        arena.map.close()
    except RPCError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        # 6. shutdown: the server unlinks the arena file and exits.
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
