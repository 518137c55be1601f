"""Curvature-adaptive optimizers against SGD and Adam on the digits MLP, side by side in one run.

    python bench/bench_optim.py            # 5 seeds (about 3 minutes on a quiet 2-core CPU)
    python bench/bench_optim.py --quick    # 1 seed

Task: sklearn digits (1797 8x8 images, 10 classes), stratified 80/20 split (random_state 0),
features standardized on the training split; MLP 64-128-128-10 with ReLU (26,122 float32
parameters), cross-entropy, mini-batches of 64, one thread. Per seed, every optimizer starts from
the same weights and sees the same batch order. A run stops when the loss over the whole
training set, checked every 10 steps, is <= --target (0.05), or after --max-steps; a NaN/Inf
loss ends it as diverged (the new optimizers raise FloatingPointError, plain SGD/Adam are checked
by the loop).

Settings (fixed before the run, not tuned on the test split):

* SGD lr 0.1 and 0.3; Adam lr 1e-3 (its default).
* SGD + CurvatureAdaptiveLR: eta_0 = gamma = 0.5, so eta -> 1/||H|| (half the edge-of-stability
  threshold 2/||H||) where the curvature is large and -> 0.5 where it is small; every = 10,
  10 Hessian-vector products per estimate, warm-started.
* HybridHessianSGD lr 0.1, HybridHessianAdam lr 1e-3: mu = 10 % of the norm of the base
  direction (the mini-batch gradient norm is 0.3-0.8 here, so mu = 0.05; Adam's direction has
  norm about sqrt(d), so mu = 0.1 sqrt(d) = 16); gamma = 0; every = 10, 10 products per refresh.

Columns of the training table (medians over seeds unless said): ``steps`` to the target
(``-``: not reached in any seed), ``wall s`` training time only (forward, backward, curvature,
update; the loss checks are not timed), ``ms/step``, ``HVPs`` Hessian-vector products spent,
``test acc`` mean +- sd over seeds at the stopping point, ``reached`` seeds that hit the target.

Overhead table: median time of 20 steps (forward, backward, step) from fixed batches, per step,
for plain SGD and with each curvature method at every = 10 and 10 products, with the HVP mode
named; ``x SGD`` is the ratio to plain SGD measured in the same run.

Correctness is checked first: the rate set by CurvatureAdaptiveLR equals eta_0 / (1 + gamma *
estimate), and the warm-started 10-product estimates are compared with a converged Lanczos
solve (relative error reported).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, markdown_table, time_fn, write_results  # noqa: E402

import landscape_ext  # noqa: E402
from landscape_lab.optim import (CurvatureAdaptiveLR, HybridHessianAdam,  # noqa: E402
                                 HybridHessianSGD, hessian_closure)

BATCH = 64
EVAL_EVERY = 10
EVERY = 10
MATVECS = 10


# ---- data and model -------------------------------------------------------------------------

def digits() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    sc = StandardScaler().fit(Xtr)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(sc.transform(Xtr)), torch.tensor(ytr), f(sc.transform(Xte)), torch.tensor(yte)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


class Batches:
    """Mini-batches of a fresh permutation per epoch, from a seeded generator."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + BATCH > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + BATCH]
        self.pos += BATCH
        return idx


# ---- optimizers -------------------------------------------------------------------------------

def configs(d: int) -> Dict[str, Callable[[nn.Module], Tuple[Any, Optional[Any]]]]:
    """name -> model -> (optimizer, scheduler or None)."""
    def calr(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        return opt, CurvatureAdaptiveLR(opt, gamma=0.5, every=EVERY, max_matvecs=MATVECS)

    return {
        "SGD lr=0.1": lambda m: (torch.optim.SGD(m.parameters(), lr=0.1), None),
        "SGD lr=0.3": lambda m: (torch.optim.SGD(m.parameters(), lr=0.3), None),
        "Adam lr=1e-3": lambda m: (torch.optim.Adam(m.parameters(), lr=1e-3), None),
        "SGD + CurvatureAdaptiveLR (eta0=gamma=0.5)": calr,
        "HybridHessianSGD lr=0.1 mu=0.05": lambda m: (HybridHessianSGD(
            m.parameters(), lr=0.1, mu=0.05, every=EVERY, max_matvecs=MATVECS), None),
        f"HybridHessianAdam lr=1e-3 mu={0.1 * math.sqrt(d):.3g}": lambda m: (HybridHessianAdam(
            m.parameters(), lr=1e-3, mu=0.1 * math.sqrt(d), every=EVERY,
            max_matvecs=MATVECS), None),
    }


def hvps_of(opt: Any, sched: Any) -> int:
    if sched is not None:
        return sched.n_matvecs
    return getattr(opt, "n_matvecs", 0)


def train(name: str, make: Callable, data, seed: int, target: float, max_steps: int
          ) -> Dict[str, Any]:
    Xtr, ytr, Xte, yte = data
    loss_fn = nn.CrossEntropyLoss()
    model = make_model(seed)
    opt, sched = make(model)
    batches = Batches(len(ytr), seed)
    step, t_train, reached, diverged = 0, 0.0, False, None
    train_loss = float("nan")
    while True:
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                train_loss = float(loss_fn(model(Xtr), ytr))
            if not math.isfinite(train_loss):
                diverged = f"train loss {train_loss} at step {step}"
                break
            if train_loss <= target:
                reached = True
                break
        if step >= max_steps:
            break
        idx = batches.next()
        x, y = Xtr[idx], ytr[idx]
        t0 = time.perf_counter()
        try:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            curv = hessian_closure(model, loss_fn, (x, y))
            if sched is not None:
                sched.step(curv, loss=loss.detach())
            if isinstance(opt, (HybridHessianSGD, HybridHessianAdam)):
                opt.step(curvature_closure=curv)
            else:
                if not math.isfinite(float(loss)):
                    raise FloatingPointError(f"loss {float(loss)} at step {step}")
                opt.step()
        except FloatingPointError as exc:
            diverged = str(exc)
            break
        t_train += time.perf_counter() - t0
        step += 1
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    out = {"optimizer": name, "seed": seed, "steps": step, "reached": reached,
           "diverged": diverged, "train_loss": train_loss, "wall_s": t_train,
           "ms_per_step": 1e3 * t_train / max(step, 1), "hvps": hvps_of(opt, sched),
           "test_acc": acc}
    if sched is not None:
        out["estimates"] = sched.history
        out["_sched"] = sched
        out["_model"] = model
    elif hasattr(opt, "history"):
        out["estimates"] = opt.history
    return out


# ---- checks ----------------------------------------------------------------------------------

def check_calr(run: Dict[str, Any], data) -> Dict[str, Any]:
    """The rate is the formula of the estimate; the warm-started estimate vs a converged one."""
    sched, model = run["_sched"], run["_model"]
    last = sched.history[-1]
    want = [b / (1 + sched.gamma * last["spectral_norm"]) for b in sched.base_lrs]
    got = [g["lr"] for g in sched.optimizer.param_groups]
    assert all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(got, want)), (got, want)
    # the last estimate's batch is not kept: compare on a fixed batch of the training split,
    # warm-started 10 products (from the run's last eigenvector) vs converged
    Xtr, ytr = data[0], data[1]
    batch = (Xtr[:BATCH], ytr[:BATCH])
    loss_fn = nn.CrossEntropyLoss()
    ref = landscape_ext.spectral_norm(hessian_closure(model, loss_fn, batch)(), tol=1e-6,
                                      max_matvecs=400)
    est = landscape_ext.spectral_norm(hessian_closure(model, loss_fn, batch)(), tol=1e-3,
                                      v0=sched.vector, max_matvecs=MATVECS)
    cold = landscape_ext.spectral_norm(hessian_closure(model, loss_fn, batch)(), tol=1e-3,
                                       max_matvecs=MATVECS)
    return {"rate_equals_formula": True, "reference_norm": ref.value,
            "reference_converged": ref.converged,
            "warm_10_rel_err": abs(est.value - ref.value) / ref.value,
            "cold_10_rel_err": abs(cold.value - ref.value) / ref.value,
            "estimates_converged_fraction": statistics.mean(
                float(h["converged"]) for h in sched.history)}


# ---- overhead ---------------------------------------------------------------------------------

def overhead(data, repeats: int) -> List[Dict[str, Any]]:
    Xtr, ytr = data[0], data[1]
    loss_fn = nn.CrossEntropyLoss()
    b = Batches(len(ytr), 123)
    batches = [(Xtr[i], ytr[i]) for i in (b.next() for _ in range(20))]

    def runner(kind: str, mode: Optional[str]):
        model = make_model(0)
        kw = {} if mode is None else {"mode": mode}
        if kind == "hybrid":
            opt = HybridHessianSGD(model.parameters(), lr=0.1, mu=0.05, every=EVERY,
                                   max_matvecs=MATVECS)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = (CurvatureAdaptiveLR(opt, gamma=0.5, every=EVERY, max_matvecs=MATVECS)
                 if kind == "calr" else None)

        def fn():
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                if kind == "sgd":
                    opt.step()
                    continue
                curv = hessian_closure(model, loss_fn, (x, y), **kw)
                if sched is not None:
                    sched.step(curv, loss=loss.detach())
                    opt.step()
                else:
                    opt.step(curvature_closure=curv)

        return fn

    cases = [("SGD (baseline)", "sgd", None, "-"),
             ("SGD + CurvatureAdaptiveLR", "calr", None, "double-backward"),
             ("SGD + CurvatureAdaptiveLR", "calr", "forward-over-reverse", "forward-over-reverse"),
             ("HybridHessianSGD", "hybrid", None, "double-backward")]
    rows = []
    base = None
    for label, kind, mode, mode_name in cases:
        t = time_fn(runner(kind, mode), warmup=1, repeats=repeats)["median_s"] / len(batches)
        base = t if base is None else base
        rows.append({"method": label, "hvp mode": mode_name,
                     "every": EVERY if kind != "sgd" else None,
                     "HVPs/estimate": MATVECS if kind != "sgd" else None,
                     "ms/step": 1e3 * t, "x SGD": t / base})
    return rows


# ---- main -------------------------------------------------------------------------------------

def summarize(runs: List[Dict[str, Any]], names: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for name in names:
        rs = [r for r in runs if r["optimizer"] == name]
        ok = [r for r in rs if r["reached"]]
        accs = [r["test_acc"] for r in rs]
        med = lambda key, sel: statistics.median(r[key] for r in sel) if sel else None  # noqa
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append({
            "optimizer": name,
            "steps": med("steps", ok) if ok else "-",
            "wall s": med("wall_s", ok) if ok else med("wall_s", rs),
            "ms/step": med("ms_per_step", rs),
            "HVPs": med("hvps", rs),
            "test acc": f"{statistics.mean(accs):.4f} +- {sd:.4f}",
            "reached": f"{len(ok)}/{len(rs)}",
            "diverged": sum(r["diverged"] is not None for r in rs),
        })
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.05)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="directory of the JSON result")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # budgeted estimates stop before convergence by design; the engine logs each one
    logging.getLogger("landscape_ext.lanczos").setLevel(logging.ERROR)
    seeds = list(range(1 if args.quick else args.seeds))
    data = digits()
    d = sum(p.numel() for p in make_model(0).parameters())
    cfg = configs(d)
    t_start = time.perf_counter()

    runs = []
    for seed in seeds:
        for name, make in cfg.items():
            r = train(name, make, data, seed, args.target, args.max_steps)
            runs.append(r)
            print(f"seed {seed} {name:45s} steps {r['steps']:5d} reached {r['reached']!s:5s} "
                  f"wall {r['wall_s']:.2f}s HVPs {r['hvps']:5d} test acc {r['test_acc']:.4f}"
                  + (f" DIVERGED: {r['diverged']}" if r["diverged"] else ""), flush=True)
    calr_runs = [r for r in runs if "_sched" in r]
    checks = [dict(seed=r["seed"], **check_calr(r, data)) for r in calr_runs]
    rows = summarize(runs, list(cfg))
    ov = overhead(data, repeats=3 if args.quick else 5)

    cols = ["optimizer", "steps", "wall s", "ms/step", "HVPs", "test acc", "reached", "diverged"]
    print(f"\n## Digits MLP ({d} parameters) to train loss <= {args.target} (max "
          f"{args.max_steps} steps), {len(seeds)} seed(s), {torch.get_num_threads()} thread(s)\n")
    print(markdown_table(rows, cols))
    print(f"\n## Overhead per step (20 steps of batch {BATCH}, median of repeats)\n")
    print(markdown_table(ov, ["method", "hvp mode", "every", "HVPs/estimate", "ms/step",
                              "x SGD"]))
    print("\n## Checks (CurvatureAdaptiveLR)\n")
    print(markdown_table(checks, ["seed", "rate_equals_formula", "reference_norm",
                                  "warm_10_rel_err", "cold_10_rel_err",
                                  "estimates_converged_fraction"]))
    for r in runs:
        for k in ("_sched", "_model"):
            r.pop(k, None)
    payload = {"machine": machine_info("cpu"),
               "settings": {"target": args.target, "max_steps": args.max_steps, "batch": BATCH,
                            "eval_every": EVAL_EVERY, "every": EVERY, "max_matvecs": MATVECS,
                            "seeds": seeds, "d": d},
               "summary": rows, "overhead": ov, "checks": checks, "runs": runs,
               "total_s": time.perf_counter() - t_start}
    path = write_results("optim_cpu", payload, args.out)
    print(f"\nwrote {path} ({payload['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
