"""
C{make mutate}: mutation testing of the ownership, inbox and outbox core with cosmic-ray.

Each module in L{MODULES} is mutated against only the fast test modules that cover it
(Clock and fakes, no PostgreSQL, no processes), with trial's C{--exitfirst} and a timeout
per mutant.  The mutants of every module are run by C{--jobs} workers at once (default:
one per core), each in its own copy of the tree under C{var/mutate/tree-N}.

Incremental and cached: each module has a cosmic-ray session in C{var/mutate/<name>.sqlite}.
A run does only what is pending; when the module's source changes its session starts
afresh, and when only its tests change the killed mutants stay killed and the survivors
are tried again.  C{--fresh} starts every session afresh.

The SQL, which cosmic-ray does not mutate, has hand-written mutants (L{SQL_MUTANTS}): each
is applied in a worker's tree, its PostgreSQL test class run, and the SQL put back; the
outcomes are cached in C{var/mutate/sql.json}.  One run at a time (C{var/mutate/lock}).

The report (score per module and every survivor) is written to
C{docs/mutation/survivors.txt}; docs/testing.md says why each survivor is left alive.

    nice -n 10 .venv/bin/python tests/mutate.py [--jobs N] [--fresh] [--no-sql] [ctrlgw/outbox.py ...]
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from queue import Queue

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cosmic_ray.commands import init
from cosmic_ray.mutating import mutate_and_test
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import MutationSpec, TestOutcome, WorkerOutcome, WorkItem, WorkResult

from tests.sqlmutants import SQL_MUTANTS, SqlMutant, applyMutant

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / "var" / "mutate"
REPORT = ROOT / "docs" / "mutation" / "survivors.txt"

# Each mutated module, and the fast test modules that cover it.
MODULES: dict[str, tuple[str, ...]] = {
    "ctrlgw/ownership.py": ("tests.test_ownership_branches",),
    "ctrlgw/cluster.py": ("tests.test_cluster_branches",),
    "ctrlgw/inbox.py": ("tests.test_inbox_branches",),
    "ctrlgw/outbox.py": ("tests.test_outbox_branches",),
    # The session life every dialect shares (SessionProtocol), and v1's wire on it.
    "ctrlgw/protocol/session.py": (
        "tests.test_connection", "tests.test_connection_branches", "tests.test_sockopts",
        "tests.test_session_branches",
    ),
    "ctrlgw/protocol/connection.py": (
        "tests.test_connection", "tests.test_connection_branches", "tests.test_sockopts",
    ),
    "ctrlgw/registry.py": ("tests.test_registry", "tests.test_registry_branches"),
    "ctrlgw/batching.py": ("tests.test_batching", "tests.test_batching_branches"),
}

# The operators applied.  cosmic-ray replaces every operator by every other; of those,
# only the replacements a slip of the hand makes are kept (a bound off by one, a test
# inverted, an exponent dropped), so that a survivor means a missing test, not noise.
OPERATORS = re.compile(
    r"core/(?:"
    r"ReplaceBinaryOperator_(?:Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Mul|Mod_FloorDiv|Pow_Mul)"
    r"|ReplaceComparisonOperator_(?:Eq_NotEq|NotEq_Eq|Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Is_IsNot"
    r"|IsNot_Is|In_NotIn|NotIn_In)"
    r"|ReplaceUnaryOperator_(?:Delete_Not|USub_UAdd)"
    r"|AddNot|ReplaceTrueWithFalse|ReplaceFalseWithTrue|ReplaceAndWithOr|ReplaceOrWithAnd"
    r"|ReplaceBreakWithContinue|ReplaceContinueWithBreak|ExceptionReplacer|NumberReplacer"
    r"|ZeroIterationForLoop"
    r")$"
)



def _tuningSpans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """
    Where a module's tuning constants are: parameter defaults, keyword arguments, module
    and class-level assignments (dataclass defaults), and the initial values of attributes
    in C{__init__}.  Their numbers are not mutated (a batch of 501 instead of 500 is no
    bug, and a counter's first value is mostly overwritten before it is read), their
    logic is.
    """
    spans = []
    for node in ast.walk(ast.parse(source)):
        values: list[ast.expr] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            values = [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
            if node.name == "__init__":
                values += [s.value for s in node.body if isinstance(s, ast.Assign | ast.AnnAssign) and s.value]
        elif isinstance(node, ast.Call):
            values = [k.value for k in node.keywords]
        elif isinstance(node, ast.Module | ast.ClassDef):
            values = [s.value for s in node.body if isinstance(s, ast.Assign | ast.AnnAssign) and s.value]
        spans += [((v.lineno, v.col_offset), (v.end_lineno or v.lineno, v.end_col_offset or 0)) for v in values]
    return spans


def applied(mutation: MutationSpec, tuning: list[tuple[tuple[int, int], tuple[int, int]]]) -> bool:
    if not OPERATORS.match(mutation.operator_name):
        return False
    if mutation.operator_name == "core/NumberReplacer":
        # cosmic-ray counts columns from 0 like ast, and lines from 1.
        return not any(start <= tuple(mutation.start_pos) < end for start, end in tuning)
    return True



# What the tests of every module share; a change to any of these re-tries the survivors.
SUPPORT = ("tests/__init__.py", "tests/helpers.py")


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes() if path.exists() else b"-")
    return h.hexdigest()


def _testPaths(tests: Sequence[str]) -> list[Path]:
    return [ROOT / (name.replace(".", "/") + ".py") for name in tests] + [ROOT / s for s in SUPPORT]


def _stem(module: str) -> str:
    return module.removeprefix("ctrlgw/").removesuffix(".py").replace("/", "_")


def testCommand(tests: Sequence[str], tree: Path | None = None) -> str:
    trial = f"{shlex.quote(sys.executable)} -m twisted.trial --exitfirst --temp-directory=_trial_mutate"
    command = f"{trial} {' '.join(tests)}"
    if tree is None:
        return command
    # cosmic-ray starts the command without a working directory of its own: enter the tree.
    return f"sh -c {shlex.quote(f'cd {shlex.quote(str(tree))} && exec {command}')}"


def prepareSession(module: str, fresh: bool) -> Path:
    """
    The module's session, brought up to date with its source and its tests.
    """
    session = STATE / f"{_stem(module)}.sqlite"
    stateFile = session.with_suffix(".json")
    sourceHash = _digest([ROOT / module])
    testsHash = _digest(_testPaths(MODULES[module]))
    state = json.loads(stateFile.read_text()) if stateFile.exists() and not fresh else {}
    if state.get("source") != sourceHash or not session.exists():
        session.unlink(missing_ok=True)
        with use_db(str(session)) as db:
            init([Path(module)], db, {})
        print(f"{module}: new session", flush=True)
    elif state.get("tests") != testsHash:
        # Killed mutants stay killed; survivors (and errors) are tried against the new tests.
        with sqlite3.connect(session) as con:
            con.execute(
                "DELETE FROM work_results WHERE test_outcome = 'SURVIVED'"
                " OR worker_outcome IN ('EXCEPTION', 'ABNORMAL')"
            )
        print(f"{module}: tests changed, survivors pending again", flush=True)
    select(module, session)
    stateFile.write_text(json.dumps({"source": sourceHash, "tests": testsHash}))
    return session


def select(module: str, session: Path) -> None:
    """
    Skip the mutants L{applied} leaves out, and make pending again those it now takes in.
    """
    tuning = _tuningSpans((ROOT / module).read_text())
    with use_db(str(session), WorkDB.Mode.open) as db:
        done = {item.job_id: result for item, result in db.completed_work_items}
        for item in db.work_items:
            wanted = all(applied(m, tuning) for m in item.mutations)
            result = done.get(item.job_id)
            skipped = result is not None and result.worker_outcome == WorkerOutcome.SKIPPED
            if not wanted and not skipped:
                db.set_result(item.job_id, WorkResult(WorkerOutcome.SKIPPED, SKIPPED))
            elif wanted and skipped:
                with sqlite3.connect(session) as con:
                    con.execute("DELETE FROM work_results WHERE job_id = ?", (item.job_id,))


SKIPPED = "operator not applied"


def makeTrees(count: int) -> list[Path]:
    trees = []
    for index in range(count):
        tree = STATE / f"tree-{index}"
        shutil.rmtree(tree, ignore_errors=True)
        for part in ("ctrlgw", "tests"):
            shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
        trees.append(tree)
    return trees


def baseline(module: str, tree: Path) -> float:
    """
    Run the module's tests (or the test module C{module}) unmutated; their time, or exit
    if they fail.
    """
    started = time.monotonic()
    tests = MODULES.get(module, (module,))
    done = subprocess.run(shlex.split(testCommand(tests, tree)), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{module}: the tests fail without any mutation:\n{done.stdout[-3000:]}")
    return time.monotonic() - started


def _inTree(item: WorkItem, tree: Path) -> list[MutationSpec]:
    return [
        MutationSpec(
            module_path=tree / m.module_path, operator_name=m.operator_name,
            operator_args=m.operator_args, occurrence=m.occurrence, start_pos=m.start_pos,
            end_pos=m.end_pos, definition_name=m.definition_name,
        )
        for m in item.mutations
    ]


SQL_STATE = STATE / "sql.json"
SQL_SUPPORT = ("tests/test_sql_guards.py", "tests/pg.py", "tests/helpers.py")


def _sqlKey(mutant: SqlMutant) -> str:
    name, path, replacements, test = mutant
    h = hashlib.sha256(repr((name, replacements, test)).encode())
    module = ROOT / ("/".join(test.split(".")[:2]) + ".py")
    h.update(_digest([ROOT / path, module, *(ROOT / s for s in SQL_SUPPORT)]).encode())
    return h.hexdigest()


def runSqlMutant(mutant: SqlMutant, tree: Path) -> str:
    """
    Apply C{mutant} in C{tree}, run its test, restore: C{killed}, C{survived}, or C{stale}
    (a text to replace is not in the file exactly once: the mutant needs updating).
    """
    name, path, replacements, test = mutant
    target = tree / path
    original = target.read_text()
    text = applyMutant(mutant, original)
    if text is None:
        return "stale"
    target.write_text(text)
    try:
        done = subprocess.run(shlex.split(testCommand([test], tree)), capture_output=True, timeout=600)
        return "survived" if done.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        return "killed"
    finally:
        target.write_text(original)


def run(modules: Sequence[str], jobs: int, fresh: bool, sql: bool = True) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    # One run at a time: a second would copy the trees anew under the first one's feet.
    lock = (STATE / "lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit("another make mutate is running (var/mutate/lock)")
    started = time.monotonic()
    sessions = {module: prepareSession(module, fresh) for module in modules}
    pending: list[tuple[str, WorkItem]] = []
    for module, session in sessions.items():
        with use_db(str(session), WorkDB.Mode.open) as db:
            pending.extend((module, item) for item in db.pending_work_items)
    sqlResults: dict[str, dict[str, str]] = (
        json.loads(SQL_STATE.read_text()) if SQL_STATE.exists() and not fresh else {}
    )
    sqlPending = [m for m in SQL_MUTANTS if sql and sqlResults.get(m[0], {}).get("key") != _sqlKey(m)]
    trees = makeTrees(jobs)
    if sqlPending:
        took = baseline("tests.test_sql_guards", trees[0])
        print(f"SQL: tests take {took:.1f}s unmutated", flush=True)
    timeouts = {}
    for module in sorted({module for module, _ in pending}):
        took = baseline(module, trees[0])
        timeouts[module] = max(20.0, 5 * took)
        print(f"{module}: tests take {took:.1f}s unmutated", flush=True)
    print(f"{len(pending)} mutants and {len(sqlPending)} SQL mutants to run with {jobs} workers", flush=True)
    free: Queue[Path] = Queue()
    for tree in trees:
        free.put(tree)

    def work(module: str, item: WorkItem) -> WorkResult:
        tree = free.get()
        try:
            return mutate_and_test(_inTree(item, tree), testCommand(MODULES[module], tree), timeouts[module])
        finally:
            free.put(tree)

    dbs = {module: WorkDB(str(session), WorkDB.Mode.open) for module, session in sessions.items()}
    try:
        with ThreadPoolExecutor(jobs) as pool:
            futures: dict[Future[WorkResult], tuple[str, WorkItem]] = {
                pool.submit(work, module, item): (module, item) for module, item in pending
            }
            done = 0
            while futures:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in finished:
                    module, item = futures.pop(future)
                    result = future.result()
                    # The diff names the tree's copy: name the module as in the checkout.
                    diff = (result.diff or "").replace(str(trees[0].parent) + "/", "")
                    diff = re.sub(r"tree-\d+/", "", diff)
                    dbs[module].set_result(
                        item.job_id,
                        WorkResult(result.worker_outcome, result.output, result.test_outcome, diff),
                    )
                    done += 1
                    if done % 25 == 0 or not futures:
                        print(f"  {done}/{len(pending)} ({time.monotonic() - started:.0f}s)", flush=True)
        with ThreadPoolExecutor(jobs) as pool:

            def sqlWork(mutant: tuple[str, str, list[tuple[str, str]], str]) -> str:
                tree = free.get()
                try:
                    return runSqlMutant(mutant, tree)
                finally:
                    free.put(tree)

            for mutant, outcome in zip(sqlPending, pool.map(sqlWork, sqlPending), strict=True):
                sqlResults[mutant[0]] = {"key": _sqlKey(mutant), "outcome": outcome}
                SQL_STATE.write_text(json.dumps(sqlResults, indent=1))
                print(f"  SQL {outcome}: {mutant[0]}", flush=True)
    finally:
        for db in dbs.values():
            db.close()
    wall = time.monotonic() - started
    last = STATE / "last-run.json"
    if pending or sqlPending or not last.exists():
        last.write_text(json.dumps({"wall": wall, "mutants": len(pending) + len(sqlPending)}))
    report(list(MODULES), json.loads(last.read_text())["wall"])


def _mutatedLine(diff: str) -> str:
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            return line[1:].strip()
    return ""


def report(modules: Sequence[str], wall: float) -> None:
    lines = [
        "# Mutation testing: surviving mutants (written by `make mutate`; see docs/testing.md).",
        "",
        "# module                          killed / run   score   survived  (skipped operators)",
    ]
    survivors: list[str] = []
    totalKilled = totalRun = 0
    for module in modules:
        session = STATE / f"{_stem(module)}.sqlite"
        if not session.exists():
            lines.append(f"{module:34} not run")
            continue
        killed = survived = skipped = errors = pending = 0
        with use_db(str(session), WorkDB.Mode.open) as db:
            pending = sum(1 for _ in db.pending_work_items)
            for item, result in db.completed_work_items:
                if result.worker_outcome == WorkerOutcome.SKIPPED:
                    skipped += 1
                elif result.worker_outcome == WorkerOutcome.NO_TEST:
                    skipped += 1
                elif result.worker_outcome != WorkerOutcome.NORMAL:
                    errors += 1
                elif result.test_outcome == TestOutcome.SURVIVED:
                    survived += 1
                    (m,) = item.mutations
                    survivors.append(
                        f"{module}:{m.start_pos[0]}: {m.operator_name.removeprefix('core/')}"
                        f" #{m.occurrence}: {_mutatedLine(result.diff or '')}"
                    )
                else:
                    killed += 1
        ran = killed + survived
        totalKilled += killed
        totalRun += ran
        score = f"{100 * killed / ran:5.1f}%" if ran else "  -  "
        extra = f"  {errors} errors" if errors else ""
        extra += f"  {pending} pending" if pending else ""
        lines.append(f"{module:34} {killed:5} / {ran:<5}  {score}  {survived:5}  ({skipped}){extra}")
    if totalRun:
        lines.append(f"{'all':34} {totalKilled:5} / {totalRun:<5}  {100 * totalKilled / totalRun:5.1f}%")
    sqlResults = json.loads(SQL_STATE.read_text()) if SQL_STATE.exists() else {}
    outcomes = [sqlResults.get(m[0], {}).get("outcome", "pending") for m in SQL_MUTANTS]
    sqlKilled = outcomes.count("killed")
    sqlRun = sqlKilled + outcomes.count("survived")
    sqlScore = f"{100 * sqlKilled / sqlRun:5.1f}%" if sqlRun else "  -  "
    lines.append(f"{'SQL (SQL_MUTANTS)':34} {sqlKilled:5} / {sqlRun:<5}  {sqlScore}"
                 f"  {outcomes.count('survived'):5}"
                 + (f"  {outcomes.count('stale')} stale" if "stale" in outcomes else "")
                 + (f"  {outcomes.count('pending')} pending" if "pending" in outcomes else ""))
    lines.append(f"# the last run that had mutants to run took {wall:.0f}s wall on {os.cpu_count()} cores")
    lines += ["", "# Survivors: module:line: operator #occurrence: the mutated line", *sorted(
        survivors, key=lambda s: (s.split(":")[0], int(s.split(":")[1])))]
    lines += ["", "# SQL survivors (and stale SQL mutants): name: file", *(
        f"{m[0]}: {m[1]}" + ("" if sqlResults[m[0]]["outcome"] == "survived" else " (stale)")
        for m in SQL_MUTANTS
        if sqlResults.get(m[0], {}).get("outcome") in ("survived", "stale")
    )]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(modules) + 6]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: all of MODULES)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fresh", action="store_true", help="start every session afresh")
    parser.add_argument("--report", action="store_true", help="only write the report")
    parser.add_argument("--no-sql", action="store_true", help="leave the SQL mutants out")
    args = parser.parse_args()
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        parser.error(f"not in MODULES: {', '.join(sorted(unknown))}")
    if args.report:
        last = STATE / "last-run.json"
        report(list(MODULES), json.loads(last.read_text())["wall"] if last.exists() else 0.0)
        return
    os.chdir(ROOT)
    run(args.modules or list(MODULES), args.jobs, args.fresh, sql=not args.no_sql)


if __name__ == "__main__":
    main()
