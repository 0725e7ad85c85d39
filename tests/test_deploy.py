"""
The deploy examples in deploy/ against the code they deploy: each file passes its own
tool's check where the tool is installed (systemd-analyze, haproxy), and every port, path,
option and configuration key it names is the real one.
"""

from __future__ import annotations

import io
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ctrlgw import cli, tap
from ctrlgw.config import GatewayConfig, Overrides, loadConfig, parseConfig
from ctrlgw.metrics import Metrics
from ctrlgw.service import _plan
from ctrlgw.web import Readiness, makeRoot

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLE_CONFIG = ROOT / "etc" / "ctrlgw.ini"
WRITERS_DRAIN = 10.0  # GatewayService._drainWriters' bound


def pacedByes(config: GatewayConfig) -> float:
    """
    The longest paced hand-over of a full instance (docs/operations.md#graceful-shutdown):
    ceil(N / bye_batch) x bye_interval + close_grace + 0.1 s, N the listeners' capacity.
    """
    connections = sum(listener.max_connections for listener in config.listeners)
    batches = math.ceil(connections / config.shutdown.bye_batch)
    return (batches - 1) * config.shutdown.bye_interval + config.liveness.close_grace + 0.1


def port(description: str) -> int:
    plan = _plan(None, description, object())
    assert plan is not None, description
    return plan.port


def twistdOptions(args: list[str], config: Path) -> tap.Options:
    """
    C{twistd ctrlgw}'s own option parser on C{args}, with C{--config} pointed at C{config}.
    """
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--config":
            args[i + 1] = str(config)
        elif arg.startswith("--config="):
            args[i] = f"--config={config}"
    options = tap.Options()
    options.parseOptions(args)
    return options


def rootChildren() -> set[str]:
    root = makeRoot(Metrics().registry, Readiness(), None)
    return {name.decode() for name in root.children}


class SystemdUnitTests(SynchronousTestCase):
    unit = DEPLOY / "systemd" / "ctrlgw.service"

    def directives(self) -> dict[str, str]:
        found = {}
        for line in self.unit.read_text().splitlines():
            if "=" in line and not line.startswith(("#", "[")):
                key, value = line.split("=", 1)
                found[key] = value
        return found

    def test_verify(self) -> None:
        """
        systemd-analyze verify accepts the unit (with ExecStart pointed at this checkout's
        twistd, as verify checks that the binary exists).
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        twistd = Path(sys.executable).parent / "twistd"
        text = self.unit.read_text().replace("/opt/ctrlgw/bin/twistd", str(twistd))
        copy = Path(self.mktemp())
        copy.mkdir()
        (copy / "ctrlgw.service").write_text(text)
        result = subprocess.run(
            [analyze, "verify", str(copy / "ctrlgw.service")],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stderr.strip(), "")

    def test_execStart(self) -> None:
        """
        ExecStart runs twistd ctrlgw in the foreground with options twistd ctrlgw accepts.
        """
        argv = shlex.split(self.directives()["ExecStart"])
        self.assertEqual(argv[0], "/opt/ctrlgw/bin/twistd")
        self.assertIn("--nodaemon", argv)
        plugin = argv.index("ctrlgw")
        options = twistdOptions([a.replace("%H", "host") for a in argv[plugin + 1 :]], EXAMPLE_CONFIG)
        self.assertEqual(options["instance-id"], "host")

    def test_stopTimeout(self) -> None:
        """
        TimeoutStopSec covers the graceful shutdown of a full instance with the example
        configuration; the unit restarts on failure and runs unprivileged.
        """
        directives = self.directives()
        self.assertEqual(directives["TimeoutStopSec"][-1], "s")
        timeout = float(directives["TimeoutStopSec"][:-1])
        config = loadConfig(str(EXAMPLE_CONFIG))
        self.assertGreater(timeout, pacedByes(config) + WRITERS_DRAIN)
        self.assertEqual(directives["Restart"], "on-failure")
        self.assertEqual(directives["User"], "ctrlgw")
        self.assertEqual(directives["NoNewPrivileges"], "yes")
        self.assertGreater(
            int(directives["LimitNOFILE"]),
            sum(listener.max_connections for listener in config.listeners) + 100,
        )


def containerInstructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


class ContainerfileTests(SynchronousTestCase):
    path = DEPLOY / "container" / "Containerfile"

    def instructions(self, word: str) -> list[str]:
        return [rest for w, rest in containerInstructions(self.path) if w == word]

    def test_copiesRealPaths(self) -> None:
        """
        Every COPY source exists in the repository (the build context is its root), and
        the package metadata and both packages (ctrlgw, the twisted plugin) are copied.
        """
        sources = set()
        for rest in self.instructions("COPY"):
            *paths, _ = rest.split()
            for source in paths:
                self.assertTrue((ROOT / source).exists(), source)
                sources.add(source)
        self.assertTrue({"setup.cfg", "pyproject.toml", "ctrlgw", "twisted", "README.md"} <= sources)

    def test_nonRoot(self) -> None:
        """
        The last USER is a numeric, non-zero uid (Kubernetes runAsNonRoot checks it), the
        one the Kubernetes manifest runs as.
        """
        user = self.instructions("USER")[-1]
        uid = int(user.split(":")[0])
        self.assertNotEqual(uid, 0)
        self.assertIn(f"--uid {uid}", " ".join(self.instructions("RUN")))
        [deployment] = [d for d in kubernetesDocuments() if d["kind"] == "Deployment"]
        self.assertEqual(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"], uid)

    def test_command(self) -> None:
        """
        ENTRYPOINT + CMD is twistd ctrlgw in the foreground with options it accepts, on the
        config file the image copies, and EXPOSE names the ports it listens on.
        """
        import json

        entrypoint = json.loads(self.instructions("ENTRYPOINT")[-1])
        command = json.loads(self.instructions("CMD")[-1])
        self.assertEqual(entrypoint[0], "twistd")
        self.assertEqual(entrypoint[-1], "ctrlgw")
        self.assertIn("--nodaemon", entrypoint)
        copies = {
            rest.split()[-1]: rest.split()[0] for rest in self.instructions("COPY")
        }
        config = command[command.index("--config") + 1]
        self.assertEqual(copies[config], "etc/ctrlgw.ini")
        options = twistdOptions(command, ROOT / copies[config])
        gateway = options.gatewayConfig
        assert gateway is not None
        listening = {port(listener.endpoint) for listener in gateway.listeners}
        listening.add(port(gateway.http.endpoint))
        exposed = {int(p) for rest in self.instructions("EXPOSE") for p in rest.split()}
        self.assertEqual(exposed, listening)
        self.assertEqual(self.instructions("STOPSIGNAL"), ["SIGTERM"])


def kubernetesDocuments() -> list[dict[str, Any]]:
    with open(DEPLOY / "kubernetes" / "ctrlgw.yaml") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


class KubernetesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.documents = {(d["kind"], d["metadata"]["name"]): d for d in kubernetesDocuments()}
        deployment = self.documents["Deployment", "ctrlgw"]
        self.pod = deployment["spec"]["template"]
        [self.container] = self.pod["spec"]["containers"]
        configMap = self.documents["ConfigMap", "ctrlgw"]
        self.config = parseConfig(configMap["data"]["ctrlgw.ini"], "ConfigMap ctrlgw")

    def namedPorts(self) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in self.container["ports"]}

    def test_kinds(self) -> None:
        self.assertEqual(
            sorted(self.documents),
            [
                ("ConfigMap", "ctrlgw"), ("Deployment", "ctrlgw"),
                ("PodDisruptionBudget", "ctrlgw"), ("Service", "ctrlgw"),
                ("Service", "ctrlgw-http"),
            ],
        )

    def test_ports(self) -> None:
        """
        The container ports are the ports the ConfigMap's configuration listens on, and the
        Services target them by name.
        """
        ports = self.namedPorts()
        self.assertEqual(ports["controllers"], port(self.config.listeners[0].endpoint))
        self.assertEqual(ports["http"], port(self.config.http.endpoint))
        for name in ("ctrlgw", "ctrlgw-http"):
            for servicePort in self.documents["Service", name]["spec"]["ports"]:
                self.assertIn(servicePort["targetPort"], ports)
        annotations = self.pod["metadata"]["annotations"]
        self.assertEqual(int(annotations["prometheus.io/port"]), ports["http"])
        self.assertIn(annotations["prometheus.io/path"].strip("/"), rootChildren())

    def test_probes(self) -> None:
        """
        Liveness on /healthz and readiness on /readyz, both resources the HTTP listener
        serves, on its port.
        """
        live, ready = self.container["livenessProbe"], self.container["readinessProbe"]
        self.assertEqual(live["httpGet"]["path"], "/healthz")
        self.assertEqual(ready["httpGet"]["path"], "/readyz")
        for probe in (live, ready, self.container["startupProbe"]):
            self.assertIn(probe["httpGet"]["path"].strip("/"), rootChildren())
            self.assertEqual(self.namedPorts()[probe["httpGet"]["port"]], port(self.config.http.endpoint))

    def test_args(self) -> None:
        """
        The container's args are options twistd ctrlgw accepts; the instance id is the
        pod's name, the DSN comes from the Secret.
        """
        env = {e["name"]: e for e in self.container["env"]}
        self.assertEqual(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name")
        self.assertIn("secretKeyRef", env["CTRLGW_DSN"]["valueFrom"])
        mount = self.container["volumeMounts"][0]["mountPath"]
        args = [
            a.replace("$(POD_NAME)", "pod-0").replace("$(CTRLGW_DSN)", "host=db")
            for a in self.container["args"]
        ]
        configArg = [a for a in args if a.startswith("--config=")][0]
        self.assertEqual(configArg, f"--config={mount}/ctrlgw.ini")
        path = Path(self.mktemp())
        path.write_text(self.documents["ConfigMap", "ctrlgw"]["data"]["ctrlgw.ini"])
        options = twistdOptions(args, path)
        assert options.gatewayConfig is not None
        self.assertEqual(options.gatewayConfig.instance_id, "pod-0")
        self.assertEqual(options.gatewayConfig.database.dsn, "host=db")

    def test_preStopDrains(self) -> None:
        """
        preStop runs ctrlgw drain on this pod's instance id, staying up idle until the
        hand-over is done; the ctrlgw command accepts exactly these arguments.
        """
        command = self.container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(command[:2], ["sh", "-c"])
        argv = shlex.split(command[2].replace('"$POD_NAME"', "pod-0").replace('"$CTRLGW_DSN"', "host=db"))
        self.assertEqual(argv[:2], ["exec", "ctrlgw"])
        args = cli.parseArguments(argv[2:], io.StringIO(), io.StringIO())
        assert not isinstance(args, int), args
        self.assertEqual((args.command, args.instance, args.stay, args.wait), ("drain", "pod-0", True, True))

    def test_terminationGracePeriod(self) -> None:
        """
        The grace period covers the preStop drain and then the SIGTERM shutdown of what
        is left, both paced by [shutdown], plus the writers' drain.
        """
        needed = 2 * pacedByes(self.config) + WRITERS_DRAIN
        self.assertGreater(self.pod["spec"]["terminationGracePeriodSeconds"], needed)

    def test_podDisruptionBudget(self) -> None:
        budget = self.documents["PodDisruptionBudget", "ctrlgw"]["spec"]
        labels = self.pod["metadata"]["labels"]
        self.assertEqual(budget["selector"]["matchLabels"], labels)
        self.assertEqual(budget["maxUnavailable"], 1)
        self.assertGreater(self.documents["Deployment", "ctrlgw"]["spec"]["replicas"], 1)

    def test_nonRoot(self) -> None:
        security = self.pod["spec"]["securityContext"]
        self.assertTrue(security["runAsNonRoot"])
        self.assertFalse(self.container["securityContext"]["allowPrivilegeEscalation"])


class HAProxyTests(SynchronousTestCase):
    path = DEPLOY / "haproxy" / "haproxy.cfg"

    def lines(self) -> list[str]:
        return [line.strip() for line in self.path.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]

    def gateway(self) -> GatewayConfig:
        return loadConfig(str(DEPLOY / "haproxy" / "gateway.ini"), Overrides())

    def test_check(self) -> None:
        """
        haproxy -c accepts the configuration.
        """
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise SkipTest("haproxy is not installed")
        result = subprocess.run(
            [haproxy, "-c", "-f", str(self.path)], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_proxyProtocolToTheGateways(self) -> None:
        """
        HAProxy sends the PROXY protocol to the gateways' controller port, whose listener
        reads it (a haproxy: endpoint).
        """
        lines = self.lines()
        [defaults] = [line for line in lines if line.startswith("default-server")]
        self.assertIn("send-proxy-v2", defaults.split())
        gateway = self.gateway()
        endpoint = gateway.listeners[0].endpoint
        self.assertTrue(endpoint.startswith("haproxy:"), endpoint)
        servers = [line.split() for line in lines if line.startswith("server ")]
        self.assertEqual(len(servers), 3)
        for server in servers:
            self.assertEqual(int(server[2].rsplit(":", 1)[1]), port(endpoint))

    def test_healthCheckOnReadyz(self) -> None:
        """
        The health check is GET /readyz on the gateways' HTTP port, expecting 200.
        """
        lines = self.lines()
        self.assertIn("option httpchk", lines)
        [send] = [line.split() for line in lines if line.startswith("http-check send")]
        self.assertEqual(send[send.index("uri") + 1], "/readyz")
        self.assertEqual(send[send.index("meth") + 1], "GET")
        self.assertIn("http-check expect status 200", lines)
        [defaults] = [line.split() for line in lines if line.startswith("default-server")]
        self.assertEqual(int(defaults[defaults.index("port") + 1]), port(self.gateway().http.endpoint))
        self.assertIn("readyz", rootChildren())

    def test_timeoutsOutliveIdleTimeout(self) -> None:
        """
        HAProxy's idle timeouts are longer than the gateway's: it never cuts an idle but
        live controller.
        """
        timeouts = {}
        for line in self.lines():
            match = re.match(r"timeout (client|server) (\d+)m$", line)
            if match:
                timeouts[match.group(1)] = int(match.group(2)) * 60
        self.assertEqual(set(timeouts), {"client", "server"})
        idle = self.gateway().liveness.idle_timeout
        self.assertTrue(all(t > idle for t in timeouts.values()), timeouts)
