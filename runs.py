"""
Run plumbing shared by pretraining (amma.py --pretrain) and finetune.py: processes (DDP under torchrun)
and how a global batch is split over them, precision, the optimiser, the training step and its device-side
meter (nothing in a step reads the device back), read points, signals, the run directory with its lock,
and atomic writes. Torch and the standard library (tqdm when installed) only; the loops themselves stay
in amma.py and finetune.py.
"""
import json
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

try:
    from tqdm import tqdm
except ImportError:  # the kit's trainers need only torch: without tqdm there is no progress bar
    class tqdm:
        def __init__(self, *args, **kwargs): pass
        def update(self, n=1): pass
        def set_postfix(self, **kwargs): pass
        def close(self): pass


# ----------------------------------------------------------------------------------------------
# processes: the split of a global batch over torchrun's processes and micro-batches

def rank_world():
    """(rank, world size) of this process: (0, 1) unless a process group is up (torchrun)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_batch_split(batch_size, world, accum, hint=""):
    """The global batch must split evenly over `world` processes x `accum` micro-batches."""
    if accum < 1:
        raise SystemExit(f"error: --grad-accum {accum}: need 1 or more")
    if batch_size % (world * accum):
        fits = [w for w in range(1, batch_size + 1) if batch_size % (w * accum) == 0]
        raise SystemExit(f"error: --batch-size {batch_size} is the global batch (the paper's number) and does not "
                         f"split evenly over {world} processes x --grad-accum {accum}: use {' or '.join(map(str, fits))} "
                         f"processes, or fewer processes with --grad-accum K (the same batch in K pieces){hint}")


def rank_share(n, rank, world, accum):
    """This process's micro-batches of a global batch of n: positions cut into world x accum contiguous
    parts (equal for a full batch), process r taking parts r*accum ... r*accum + accum - 1. None for
    a last, partial batch with fewer proteins than parts (it is skipped)."""
    parts = world * accum
    if n < parts:
        return None
    bounds = [n * p // parts for p in range(parts + 1)]
    return [list(range(bounds[p], bounds[p + 1])) for p in range(rank * accum, (rank + 1) * accum)]


def epoch_steps(plan, first, n_steps, rank, world, accum):
    """[(step, this process's micro-batches as position lists)] from `first` on (partial batches skipped)."""
    parts = {s: rank_share(len(plan[s]), rank, world, accum) for s in range(n_steps)}
    return [(s, parts[s]) for s in range(first, n_steps) if parts[s] is not None], any(parts.values())


# ----------------------------------------------------------------------------------------------
# processes, precision, optimiser, the step, its meter and read points, signals, the run directory

def setup_distributed(tc):
    """DDP only when launched by torchrun (RANK set): returns rank, world size, device."""
    from datetime import timedelta
    if "RANK" not in os.environ:
        device = torch.device(tc.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 1, device
    cuda = torch.cuda.is_available() and tc.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():   # an explicit timeout: a dead rank is an error, not a hang
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             timeout=timedelta(minutes=getattr(tc, "dist_timeout", 30)))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank, world, torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")


def run_as_script(main):
    """`python script.py ...` and torchrun's processes: runs main() and exits with its status (an int it
    returns, else 0; SystemExit as usual). A torchrun process ends with os._exit once its output is flushed:
    by then its process group is destroyed and its files are closed, and torch's C++ teardown during
    interpreter shutdown can abort a rank that has finished ('terminate called without an active
    exception' after destroy_process_group, about 1 run in 20-90 here), failing a run that succeeded."""
    try:
        result = main()
        code = result if type(result) is int else 0
    except SystemExit as e:
        code = e.code
    if "RANK" not in os.environ:
        sys.exit(code)
    if not isinstance(code, int):                # as sys.exit treats them: None is 0, a message goes to stderr, 1
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leave_distributed(world, ended):
    """The end of a torchrun process's run, however it ended: the run's DDP objects are freed first (no
    reducer left for interpreter shutdown), after a run that ended well a barrier (no process leaves while
    another still talks to it), then the group is destroyed; run_as_script then skips the shutdown itself."""
    if world == 1:
        return
    import gc
    gc.collect()
    if ended:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def wrap_ddp(model, world):
    """DDP over the processes (gradients bucketed in place: no extra copy per step); the model alone without."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)


def amp_context(amp, device):
    """One autocast context for the whole step: bf16 (default on GPU; forced on CPU by amp='bf16') or none."""
    if amp not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"error: --amp {amp!r}: auto, bf16 or fp32")
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(params, name, device, **kw):
    """Adam or AdamW, fused into a few kernels on a GPU (foreach on the CPU)."""
    Opt = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return Opt(params, fused=True, **kw) if device.type == "cuda" else Opt(params, **kw)


def maybe_compile(model, tc):
    """--compile: the forward pass and loss as one torch.compile'd graph (fullgraph: a graph break is an
    error, not a silent slowdown); --cuda-graphs also replays them as CUDA graphs per shape."""
    if not (tc.compile or tc.cuda_graphs):
        return model
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)   # bucketed shapes
    return torch.compile(model, fullgraph=True, dynamic=True, mode="reduce-overhead" if tc.cuda_graphs else None)


def strip(batch):
    """The tensors of a batch (and its all_kept flag) without the id strings: a compiled step guards on
    every input it reads, and the ids are not for the model."""
    return {k: v for k, v in batch.items() if k != "ids"}


def train_step(net, opt, batches, loss_fn, world, dropout_seeds):
    """One optimiser step over this process's micro-batches of a global batch. loss_fn(batch) -> (loss,
    logs) gives each micro-batch's share of the global batch's loss; DDP averages gradients over the
    processes, so the loss is scaled by world to sum them. Returns the summed loss and logs, as
    device tensors: nothing here waits for the device."""
    opt.zero_grad(set_to_none=True)
    total, logs = 0.0, {}
    last = len(dropout_seeds) - 1
    for k, (batch, seed) in enumerate(zip(batches, dropout_seeds)):
        torch.manual_seed(seed)                                                # dropout, per micro-batch
        with net.no_sync() if world > 1 and k < last else nullcontext():
            loss, parts = loss_fn(batch)
            (loss * world).backward()
        total = total + loss.detach()
        logs = {m: logs.get(m, 0.0) + torch.nan_to_num(v) for m, v in parts.items()}
    opt.step()
    return total, logs


class Meter:
    """Losses summed on the device, read back only at log and save points (one small transfer).
    `epoch` is the epoch's running sum of the step losses in float64, exact across a resume; `interval`
    sums (loss, parts...) since the last log line; `first_bad` is the first step whose loss was not
    finite (-1: none)."""

    def __init__(self, names, device, epoch_sum=0.0):
        self.names, self.device = names, device
        self.epoch = torch.tensor(epoch_sum, dtype=torch.float64, device=device)
        self.interval = torch.zeros(1 + len(names), dtype=torch.float64, device=device)
        self.first_bad = torch.tensor(-1, dtype=torch.long, device=device)
        self.zero = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, loss, logs, step):
        loss = loss.double()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)
        self.epoch += loss
        self.interval += torch.stack([loss] + [logs[m].double() if m in logs else self.zero for m in self.names])
        self.steps += 1

    def read(self, flags=()):
        """Global values (summed over the processes) as Python numbers: (epoch sum, interval sums, first
        bad step or -1, flags summed over the processes). The one host sync of a read point."""
        vec = torch.cat([self.epoch[None], self.interval, torch.tensor([float(f) for f in flags], dtype=torch.float64,
                                                                       device=self.device)])
        bad = self.first_bad.double()
        if rank_world()[1] > 1:
            torch.distributed.all_reduce(vec)
            bad = torch.where(bad < 0, float("inf"), bad)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
            bad = torch.where(torch.isinf(bad), -1.0, bad)
        values, bad = vec.tolist(), int(bad.item())
        n = 1 + len(self.names)
        return values[0], values[1:1 + n], bad, values[1 + n:]

    def reset_interval(self):
        self.interval.zero_()
        self.steps = 0


def stop_if_bad(bad, epoch, ckpt):
    if bad >= 0:
        raise SystemExit(f"error: the loss is not finite at epoch {epoch + 1} step {bad + 1}; stopping (the last "
                         f"checkpoint, from before that step, is {ckpt})")


def read_point(tc, state, s, n_steps, world, stop, last_save):
    """Whether step s ends at a read point: a log line, a step checkpoint, the epoch's end; on one process
    also as soon as a signal came or a timed checkpoint is due (under DDP those are agreed at read points)."""
    if s + 1 == n_steps or state["epoch_steps"] % tc.log_every == 0:
        return True
    if tc.save_every_steps and state["steps_done"] % tc.save_every_steps == 0:
        return True
    return world == 1 and (stop.signum is not None or save_due(tc, last_save))


def save_due(tc, last_save):
    return bool(tc.save_every_minutes) and time.time() - last_save > 60 * tc.save_every_minutes


def progress(total, desc, disable=False, initial=0):
    """tqdm that updates often on a terminal and once a minute in a redirected log."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=disable, initial=initial, leave=False, dynamic_ncols=True,
                mininterval=0.5 if tty else 60.0, maxinterval=10.0 if tty else 600.0)


class Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (cluster schedulers) only set `signum`: the training loop finishes
    its step, writes a checkpoint and exits (status 130 / 143). A second signal stops at once."""

    def __enter__(self):
        self.signum, self.old = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def exit(self, where, path, is_main):
        """Leave after a checkpoint was written at `where`."""
        signum = self.signum or signal.SIGTERM          # under DDP another process may have been signalled
        if is_main:
            print(f"\ninterrupted ({signal.Signals(signum).name}) at {where}: {path} written; continue with "
                  f"the same command and --resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)


def prepare_out(out, resume, overwrite, is_main, say, files=("checkpoint.pt", "log.jsonl")):
    """The run directory. Returns the checkpoint to resume or None. A new run never lands silently in a
    directory that holds one: it needs --resume (continue it) or --overwrite (remove it, start again)."""
    if resume and overwrite:
        raise SystemExit("error: --resume and --overwrite exclude each other")
    ckpt = out / "checkpoint.pt"
    held = [f for f in files if (out / f).exists()]
    if resume:
        if ckpt.exists():
            return ckpt
        say(f"--resume: no checkpoint at {ckpt}: starting fresh")
        return None
    if held and not overwrite:
        raise SystemExit(f"error: {out} already holds a run ({', '.join(held)}): --resume continues it, "
                         "--overwrite starts it again, or choose another --out")
    if held and is_main:
        for f in held:
            (out / f).unlink()
        say(f"--overwrite: removed {', '.join(held)} from {out}")
    return None


def check_same(saved, now, keys, source, what="settings"):
    """A checkpoint to continue must have been made with the same values of `keys`."""
    differ = [k for k in keys if saved.get(k) != now.get(k)]
    if differ:
        raise SystemExit(f"error: {source} was made with other {what} ({', '.join(differ)}); use the same flags "
                         f"to resume, or another --out")


def load_training_state(ckpt, model, opt, sched, state):
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    state.update({k: ckpt[k] for k in state})


def new_run_id():
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.urandom(3).hex()}"


def write_error(path, e):
    """A failed write as one line: the path, the reason and the free space there."""
    import shutil
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2 ** 30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    reason = os.strerror(e.errno) if getattr(e, "errno", None) else last_line(e)
    return SystemExit(f"error: cannot write {path}: {reason} ({free}); nothing partial was kept")


def atomic_write(write, path, error=write_error):
    """write(tmp) then rename over path: a reader never sees a partial file, and the temporary file is
    removed on every error path (a full disk is error(path, e): one line naming the path, not a traceback)."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:          # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise error(path, e) from None


def atomic_save(obj, path):
    atomic_write(lambda tmp: torch.save(obj, tmp), path)


def atomic_write_text(path, text):
    atomic_write(lambda tmp: tmp.write_text(text), path)


class RunLock:
    """A run directory is owned by one process at a time: an exclusive lock on <out>/.lock, taken before
    anything else and held until the process lets go (the kernel releases it on any exit, kill -9 too).
    A second run into the same --out is a one-line error naming the one that holds it. Taking the lock
    also checks --out (a regular file, a path under one, a read-only place: one line each) and removes
    the temporary files that runs killed mid-write left there. Under torchrun rank 0 holds it."""

    def __init__(self, out, enabled=True):
        self.out, self.enabled, self.fd = Path(out), enabled, None

    def __enter__(self):
        if not self.enabled:
            return self
        import fcntl
        import socket
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SystemExit(f"error: --out {self.out}: {out_problem(self.out, e)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise SystemExit(f"error: {self.out} is in use by another run ({holder}): wait for it to end, or "
                             "choose another --out") from None
        left = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
        if left:
            print(f"note: {self.out} was left locked by a run that did not end cleanly ({left}); it is not "
                  f"running any more: taking over", file=sys.stderr)
        stale = [p for p in self.out.glob("*.tmp") if p.is_file()]
        for p in stale:                          # nobody else writes here while we hold the lock
            p.unlink(missing_ok=True)
        if stale:
            print(f"note: removed {len(stale)} temporary files of interrupted writes in {self.out} "
                  f"({', '.join(p.name for p in stale[:3])}{' ...' if len(stale) > 3 else ''})", file=sys.stderr)
        me = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: " \
             f"{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}"[:4000]
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, me.encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl
            os.ftruncate(self.fd, 0)             # a clean end leaves an empty lock file
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def out_problem(out, e):
    """Why an --out cannot be a run directory, in words."""
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a folder" if parent == out else f"it lies under {parent}, which is a file"
    return f"cannot be written ({os.strerror(e.errno) if e.errno else e})"


def to_plain(config):
    """A dataclass as a dict of plain values (tuples as lists) for checkpoints and JSON."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def last_line(e):
    """The message of an error, without the worker traceback a DataLoader wraps around it."""
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------
# the log and the read points of a loop

class RunLog:
    """log.jsonl of rank 0: one JSON object a line, each with the run id (a no-op on the other ranks)."""

    def __init__(self, path, run, enabled):
        self.run, self.file = run, open(path, "a") if enabled else None

    def write(self, **record):
        if self.file:
            self.file.write(json.dumps({"run": self.run, **record}) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def log_step(log, meter, interval, epoch, s, lr, present):
    """One log line: the mean loss (and each modality's part and share of it) over the steps since the last line."""
    n = max(meter.steps, 1)
    loss = interval[0] / n
    parts = {k: v / n for k, v in zip(meter.names, interval[1:]) if k[5:] in present}
    shares = {f"share_{k[5:]}": v / loss for k, v in parts.items() if loss}
    log.write(epoch=epoch + 1, step=s + 1, loss=loss, steps_averaged=meter.steps, **parts, **shares, lr=lr)
    meter.reset_interval()
    return loss


def at_read_point(meter, tc, state, stop, save, ckpt, epoch, s, n_steps, last_save, bar, write_log, is_main):
    """The one host sync of a read point: the losses (stopping on a non-finite one), the log line, and the
    checkpoint a signal or the schedule asks for. Returns the time of the last save. Shared with finetune.py."""
    epoch_sum, interval, bad, (stopping, due) = meter.read((stop.signum is not None, save_due(tc, last_save)))
    stop_if_bad(bad, epoch, ckpt)
    state["epoch_loss"] = epoch_sum
    if state["epoch_steps"] % tc.log_every == 0 or s + 1 == n_steps:
        bar.set_postfix(loss=f"{write_log(interval):.4f}", refresh=False)
        meter.reset_interval()
    if stopping:
        bar.close()
        save(epoch, s + 1)
        stop.exit(f"epoch {epoch + 1}, step {s + 1} of {n_steps}", ckpt, is_main)
    if s + 1 < n_steps and (due or (tc.save_every_steps and state["steps_done"] % tc.save_every_steps == 0)):
        save(epoch, s + 1)
        return time.time()
    return last_save
