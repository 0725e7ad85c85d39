"""
The benchmark page from one run's JSON: C{render(result, docs)} writes C{docs/benchmarks.md}
and the plots under C{docs/bench/} (matplotlib, Agg backend).  Nothing on the page comes
from anywhere but the JSON and C{bench/intro.md}.

  python bench/report.py var/bench.json docs      # re-render without re-running
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == int(value) and abs(value) >= 100:
            return f"{int(value):,}"
        return f"{value:,.{digits}f}" if abs(value) >= 10 else f"{value:.{max(digits, 2)}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def logx(ax: Any) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    n = len(values)
    ax.plot(sorted(values), [(i + 1) / n for i in range(n)], label=label)


def plots(result: dict[str, Any], folder: str) -> list[tuple[str, str]]:
    """
    Draw each plot whose scenarios produced data; returns (file name, caption) of each.
    """
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):
        if old.endswith(".png"):
            os.remove(os.path.join(folder, old))  # only this run's plots
    s = result["scenarios"]
    made = []

    def plot(name: str, caption: str, draw: Callable[[], Any], size: tuple[float, float] = (7, 4)) -> None:
        fig = plt.figure(figsize=size)
        try:
            draw()
        except (KeyError, TypeError):
            plt.close(fig)  # a scenario that failed or did not run: no plot
            return
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=110)
        plt.close(fig)
        made.append((name, caption))

    def commandCdf() -> None:
        ax = plt.gca()
        for n, entry in s["commands"]["fleets"].items():
            cdf(ax, entry["series"]["cmd_ms"], f"ctrlgw, {int(n):,} controllers")
        cdf(ax, s["commands"]["pgqueuer"]["series"]["latency_ms"], "PgQueuer (enqueue → handler)")
        logx(ax)
        ax.set_xlabel("ms")
        ax.set_ylabel("share of commands")
        ax.set_title("Command latency: send() → controller reads the cmd")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    def commandP99() -> None:
        ax = plt.gca()
        sizes = sorted(int(n) for n in s["commands"]["fleets"])
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            ax.plot(sizes, [s["commands"]["fleets"][str(n)]["median"][key] for n in sizes], marker="o",
                    label=f"ctrlgw {label}")
        ax.axhline(s["commands"]["pgqueuer"]["median"]["p99_ms"], color="gray", linestyle="--", label="PgQueuer p99")
        logx(ax)
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.set_xlabel("connected controllers")
        ax.set_ylabel("ms")
        ax.set_title("Command latency against fleet size (median of runs)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    def throughput() -> None:
        left, right = plt.gcf().subplots(1, 2)
        acks = s["inbound"]["series"]["acks_per_second"]
        sent = s["inbound"]["series"]["msgs_per_second"]
        left.plot(range(1, len(sent) + 1), sent, marker=".", label="sent")
        left.plot(range(1, len(acks) + 1), acks, marker=".", label="acked")
        left.legend(fontsize=8)
        left.set_title("Inbound: msgs per second")
        left.set_xlabel("second of the run")
        left.grid(True, alpha=0.3)
        points = s["backlog"]["ctrlgw"]["series"]["delivered_over_time"]
        rates = [(t1, (c1 - c0) / (t1 - t0)) for (t0, c0), (t1, c1) in zip(points, points[1:], strict=False) if t1 > t0]
        # Half-second bins: the raw 0.1 s samples are noisy.
        binned: dict[int, list[float]] = {}
        for t, r in rates:
            binned.setdefault(int(t * 2), []).append(r)
        right.plot([k / 2 for k in sorted(binned)], [sum(v) / len(v) for _, v in sorted(binned.items())], marker=".")
        right.set_title("Backlog: commands delivered per second")
        right.set_xlabel("seconds since the backlog's commit")
        right.grid(True, alpha=0.3)

    def other() -> None:
        ax = plt.gca()
        for scenario, key, label in (("inbound", "msg_ack_ms", "inbound msg → ack"),
                                     ("storm", "welcome_ms", "connect storm hello → welcome"),
                                     ("takeover", "seen_ms", "takeover: B's welcome → A's socket closed")):
            if scenario in s and "series" in s[scenario]:
                cdf(ax, [max(v, 0.01) for v in s[scenario]["series"][key]], label)
        if not ax.lines:
            raise KeyError("no latencies")
        logx(ax)
        ax.set_xlabel("ms (takeover: values ≤ 0 drawn at 0.01)")
        ax.set_ylabel("share")
        ax.set_title("Other latencies")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    plot("command-latency-cdf.png", "Command latency CDFs by fleet size, and PgQueuer's at the same rate", commandCdf)
    plot("command-p99-vs-fleet.png", "Command p50 and p99 against the number of connected controllers", commandP99)
    plot("throughput.png", "Throughput over time: inbound msgs sent and acked, and the backlog's drain", throughput,
         (10, 4))
    plot("other-latency-cdf.png", "Inbound ack, connect-storm welcome and takeover latency CDFs", other)
    return made


def verdictLines(result: dict[str, Any], scenario: str) -> str:
    lines = []
    for r in result["verdicts"]:
        if r["scenario"] == scenario:
            met = {True: "**met**", False: "**not met**", None: "no figure"}[r["met"]]
            lines.append(f"- Target: {r['what']} {r['target']}: {met} ({fmt(r['value'], 2)} {r['unit']})")
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def settingsText(settings: dict[str, dict[str, str]]) -> str:
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in values.items()]
    return "\n".join(lines)


def render(result: dict[str, Any], docs: str) -> str:
    made = plots(result, os.path.join(docs, "bench"))
    s = result["scenarios"]
    z = result["sizes"]
    m, v, g = result["machine"], result["versions"], result["git"]
    with open(os.path.join(HERE, "intro.md")) as f:
        out = [f.read().rstrip() + "\n"]
    if result["smoke"]:
        out.append("\n> **Smoke run**: tiny sizes, one run each. It checks that every scenario works; "
                   "its figures are not results.\n")
    commit = g["commit"][:12] + (" with uncommitted changes" if g["dirty"] else "")
    out.append("\n## This run\n\n")
    out.append(table(["", ""], [
        ["date (UTC)", result["date"]], ["commit", commit],
        ["CPU", f"{m['cpu']}, {m['cores']} cores"], ["RAM", f"{m['ram_gib']} GiB"], ["kernel", m["kernel"]],
        ["Python", v["python"]], ["Twisted", v["twisted"]], ["PostgreSQL", f"{v['postgresql']} ({result['postgresql']})"],
        ["PgQueuer", v["pgqueuer"]], ["ctrlgw", v["ctrlgw"]], ["runs per figure", result["repeat"]],
        ["scenarios run", ", ".join(result.get("only", list(result["scenarios"])))],
    ]))
    out.append("\nGateway settings (every instance; ports, instance ids and the schema are set per "
               "instance, everything else is the default):\n\n```ini\n" + settingsText(result["gateway_settings"]) + "\n```\n")

    def section(name: str, title: str, body: Callable[[], None]) -> None:
        """
        A scenario's section; one line instead when the scenario failed (or was not run).
        """
        if name not in s:
            return
        mark = len(out)
        try:
            if "error" in s[name]:
                raise RuntimeError(s[name]["error"])
            body()
        except (KeyError, TypeError, RuntimeError) as e:
            del out[mark:]
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            out.append(f"\n## {title}\n\n**This scenario failed in this run**: {first.replace('|', '/')}\n")

    out.append("\n## Targets\n\n")
    out.append(table(["scenario", "figure", "value", "target", "met"], [
        [r["scenario"], r["what"], f"{fmt(r['value'], 2)} {r['unit']}", r["target"],
         {True: "**yes**", False: "**no**", None: "no figure"}[r["met"]]] for r in result["verdicts"]]))

    def section_commands() -> None:
        cmd = s["commands"]
        pg = cmd["pgqueuer"]["median"]
        out.append(f"\n## 1. Command latency against fleet size\n\nFor each fleet size, that many controllers "
                   f"connect to one instance and stay idle (answering pings); then {fmt(z['commandRate'])} "
                   f"single `send()` calls per second for {fmt(z['commandSeconds'])} s, round-robin over them, "
                   "each from its own statement on a pool of 8 connections. Latency runs from just before "
                   "the `send()` call (`sent_ms` in the body) to the controller reading the `cmd`. PgQueuer: "
                   "single `enqueue()` calls at the same paced rate, sent the same way (each issued on "
                   "schedule on the next free connection of a pool of 8), from just before the call to the "
                   "handler's start (batch size 10).\n\n"
                   "Each latency includes the application's own commit: *call* runs from just before "
                   "the `send()` or `enqueue()` call to its result. *after the call* runs from that "
                   "result to the controller reading the `cmd` (to the handler's start), matched by "
                   "command (job) id: what the gateway (the queue) adds once the command is committed. "
                   "It can be below zero: the doorbell is delivered at the commit, and the gateway can "
                   "write the command before the application has read the reply.\n\n")
        rows = []
        for n, entry in cmd["fleets"].items():
            f = entry["median"]
            rows.append([f"ctrlgw, {int(n):,} controllers", f["commands"], f["p50_ms"], f["p99_ms"], f["max_ms"],
                         f.get("call_p50_ms"), f.get("call_p99_ms"),
                         f.get("after_call_p50_ms"), f.get("after_call_p99_ms"),
                         None if not pg["p99_ms"] else round(f["p99_ms"] / pg["p99_ms"], 2)])
        rows.append(["PgQueuer", pg["jobs"], pg["p50_ms"], pg["p99_ms"], pg["max_ms"],
                     pg.get("call_p50_ms"), pg.get("call_p99_ms"),
                     pg.get("after_call_p50_ms"), pg.get("after_call_p99_ms"), 1.0])
        out.append(table(["", "commands", "p50 ms", "p99 ms", "max ms", "call p50 ms", "call p99 ms",
                          "after the call p50 ms", "after the call p99 ms", "p99 / PgQueuer p99"], rows))
        out.append(verdictLines(result, "commands"))
        if pg.get("after_call_p99_ms"):
            ratios = ", ".join(
                f"{int(n):,}: {fmt(entry['median']['after_call_p99_ms'] / pg['after_call_p99_ms'], 2)} ×"
                for n, entry in cmd["fleets"].items() if entry["median"].get("after_call_p99_ms") is not None)
            out.append(f"- After the call, p99 / PgQueuer's (not a target: the commit each side waits for is "
                       f"left out): {ratios}\n")
        if "commit" in cmd:
            c = cmd["commit"]["median"]
            out.append(f"- The floor, in the same run: an `INSERT` and a `NOTIFY` committed in one transaction "
                       f"(what `send()` commits), {fmt(z['commandRate'])} a second on the same pool, with no fleet "
                       f"connected: p50 {fmt(c['p50_ms'], 2)} ms, p99 {fmt(c['p99_ms'], 1)} ms, "
                       f"max {fmt(c['max_ms'], 1)} ms (runs' p99: "
                       + " / ".join(fmt(r["p99_ms"], 1) for r in cmd["commit"]["runs"]) + " ms)\n")

    section("commands", "1. Command latency against fleet size", section_commands)

    def section_backlog() -> None:
        bl = s["backlog"]
        c, p = bl["ctrlgw"]["median"], bl["pgqueuer"]["median"]
        out.append(f"\n## 2. Backlog drain\n\n{fmt(z['backlogControllers'])} controllers connect first; then "
                   f"{fmt(z['backlog'])} commands are enqueued with `send_many()` (10,000 per statement, "
                   "all in one transaction) while they are connected; the clock runs from its commit, with the "
                   "whole backlog in place, to no command of theirs left `pending` or `sent` (all `acked`); "
                   "*enqueue seconds* is the transaction, not timed. PgQueuer: the same number of jobs "
                   f"enqueued first (not timed), then one worker at batch size {z['pgqueuerBatch']} drains "
                   "them.\n\n")
        out.append(table(["", "commands", "seconds", "per second", "enqueue seconds"], [
            ["ctrlgw", c["commands"], c["seconds"], c["per_second"], c["enqueue_seconds"]],
            ["PgQueuer", p["jobs"], p["seconds"], p["per_second"], None]]))
        out.append(verdictLines(result, "backlog"))

    section("backlog", "2. Backlog drain", section_backlog)

    def section_inbound() -> None:
        i = s["inbound"]["median"]
        out.append(f"\n## 3. Inbound messages\n\n`ctrlgw sim` ({z['inboundProcs']} process(es)) with "
                   f"{fmt(z['inboundControllers'])} controllers offers {fmt(z['inboundRate'])} `msg`/s for "
                   f"{fmt(z['inboundSeconds'])} s, each controller leaving at most "
                   f"{fmt(z.get('inboundWindow', 0))} unacked (the pacer skips a controller at its window, "
                   "so past the gateway's capacity the offer waits for acks: the figure is capacity, "
                   "not what piles up in socket buffers); an `ack` "
                   "means the message is committed. Per second: the mean of the whole seconds with the "
                   "fleet connected and the pacer running, from the simulator's progress lines; `unanswered` "
                   "are messages still unacked when the fleet hung up (2 s after the pacer stopped).\n\n")
        out.append(table(["sent msgs/s", "acked msgs/s", "acked", "unanswered", "errors", "msg→ack p50 ms",
                          "p99 ms", "max ms"], [
            [i["sent_per_second"], i["per_second"], i["acked"], i["unanswered"], i["errors"], i["p50_ms"],
             i["p99_ms"], i["max_ms"]]]))
        out.append(verdictLines(result, "inbound"))

    section("inbound", "3. Inbound messages", section_inbound)

    def section_idle() -> None:
        d = s["idle"]["median"]
        out.append(f"\n## 4. Idle fleet\n\nA fresh instance; {fmt(z['idle'])} controllers connect as fast as "
                   "one simulator process dials them (200 per reactor turn) and stay idle (`ping_interval` 15 s). "
                   "RSS from `/proc/PID/status` before they connect and 2 s after the last welcome (it includes "
                   "what the connect burst left allocated: the process keeps its peak); CPU from `utime + stime` "
                   "in `/proc/PID/stat` over the window that follows.\n\n")
        out.append(table(["connections", "RSS before MB", "RSS after MB", "KiB per connection", "window s",
                          "CPU % of one core", "disconnects"], [
            [d["connections"], d["rss_before_mb"], d["rss_after_mb"], d["kb_per_connection"], d["window_seconds"],
             d["cpu_percent"], d["disconnects"]]]))
        out.append(verdictLines(result, "idle"))

    section("idle", "4. Idle fleet", section_idle)

    def section_storm() -> None:
        st = s["storm"]["median"]
        out.append(f"\n## 5. Connect storm\n\nA fresh instance; {fmt(z['storm'])} controllers dial at once "
                   "(one process, 200 dials per reactor turn, listen backlog 4096); the clock runs from the first dial to the last "
                   "`welcome` read (a welcome follows the committed session claim).\n\n")
        out.append(table(["controllers", "seconds", "welcomes/s", "hello→welcome p50 ms", "p99 ms", "errors"], [
            [st["controllers"], st["seconds"], st["per_second"], st["welcome_p50_ms"], st["welcome_p99_ms"],
             st["errors"]]]))
        out.append(verdictLines(result, "storm"))

    section("storm", "5. Connect storm", section_storm)

    def section_takeover() -> None:
        t = s["takeover"]["median"]
        out.append(f"\n## 6. Takeover\n\nTwo instances, A and B. {fmt(z['takeover'])} controllers connect to A; "
                   f"then the same ids say hello on B, {fmt(z['takeoverRate'])} per second. Gateway view: "
                   "`ctrlgw_takeover_convergence_seconds` on A (B's claim committed → A's old socket aborted), "
                   "the difference of two scrapes. Controller view: B's `welcome` read → A's socket closed "
                   "(negative when A closed it first).\n\n")
        out.append(table(["controllers", "observed", "gateway mean ms", "gateway p99 ms (bucket bound)",
                          "seen p50 ms", "seen p99 ms", "seen max ms"], [
            [t["controllers"], t["gateway_observed"], t["gateway_mean_ms"], t["gateway_p99_ms_bucket"],
             t["seen_p50_ms"], t["seen_p99_ms"], t["seen_max_ms"]]]))
        out.append(verdictLines(result, "takeover"))

    section("takeover", "6. Takeover", section_takeover)

    # --- the application stream (docs/consuming.md) ---

    def section_stream() -> None:
        st = s["stream"]
        grp, rd, lat = st["groups"]["median"], st["read"]["median"], st["latency"]["median"]
        out.append(f"\n## 7. Application stream\n\nThree instances; {fmt(z['streamControllers'])} controllers "
                   f"spread over them send {fmt(z['streamMessages'])} msgs while four `ctrlgw.client` "
                   "consumers of one group, started at the end of the stream, read (lease 5 min, so no "
                   "lease runs out): every stored message must be handled exactly once. Then one consumer reads a backlog of "
                   f"{fmt(z['streamBacklog'])} message entries (and whatever the stream already held) in "
                   f"batches of {fmt(z['streamBatch'])}. Then a fleet sends {fmt(z['streamRate'])} msgs/s "
                   "through one instance for "
                   f"{fmt(z['streamSeconds'])} s with one consumer: the latency from the msg's `ts` to the "
                   "consumer's callback (the first second left out).\n\n")
        out.append(table(["figure", "value"], [
            ["3 × 4: stored / handled", f"{fmt(grp['stored'])} / {fmt(grp['handled'])}"],
            ["3 × 4: missed, duplicated (worst run)",
             f"{max(r['missed'] for r in st['groups']['runs'])}, {max(r['duplicated'] for r in st['groups']['runs'])}"],
            ["3 × 4: entries per consumer (last run)", ", ".join(map(str, grp["per_consumer"]))],
            ["one consumer: entries/s", fmt(rd["per_second"])],
            ["msg → callback p50 / p99 / max ms", f"{fmt(lat['p50_ms'])} / {fmt(lat['p99_ms'])} / {fmt(lat['max_ms'])}"],
            ["same msgs, msg → ack p50 / p99 ms (the inbox's share)",
             f"{fmt(lat.get('ack_p50_ms'))} / {fmt(lat.get('ack_p99_ms'))}"],
            ["same msgs, msg → entry `at` (flush transaction start) p50 / p99 ms",
             f"{fmt(lat.get('stored_p50_ms'))} / {fmt(lat.get('stored_p99_ms'))}"],
            ["same msgs, entry `at` → callback (commit, notify, horizon, read) p50 / p99 ms",
             f"{fmt(lat.get('delivered_p50_ms'))} / {fmt(lat.get('delivered_p99_ms'))}"],
        ]))
        out.append(verdictLines(result, "stream"))

    section("stream", "7. Application stream", section_stream)

    # Written by bench/partitions.py (make bench-partitions), from its own run.
    partitions = os.path.join(docs, "bench", "partitions.md")
    if os.path.exists(partitions):
        with open(partitions) as f:
            out.append("\n" + f.read())

    out.append("\n## Plots\n\n")
    for name, caption in made:
        out.append(f"![{caption}](bench/{name})\n\n")
    page = os.path.join(docs, "benchmarks.md")
    with open(page, "w") as f:
        f.write("".join(out).rstrip() + "\n")
    return page


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render(json.load(f), sys.argv[2]))
