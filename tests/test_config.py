"""
Tests for L{ctrlgw.config}.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ctrlgw.cluster import takeoverChannel
from ctrlgw.config import (
    ConfigError,
    GatewayConfig,
    Overrides,
    loadConfig,
    parseConfig,
    parseDuration,
    sectionKeys,
)
from ctrlgw.framing import FramingError
from ctrlgw.outbox import commandsChannel, resultsChannel

from .helpers import iniText, makeConfig

SOURCE = "test.ini"
LISTENER = {"listener:main": {"endpoint": "tcp:7000"}}
EXAMPLE_INI = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "ctrlgw.ini"
)
LISTENER_SECTION = "listener:NAME"


def sectionValues(config: GatewayConfig, section: str) -> Any:
    """
    The parsed object of a fixed section (C{[gateway]} is flattened onto the config).
    """
    return config if section == "gateway" else getattr(config, section)


class ConfigErrorAssertions(SynchronousTestCase):
    def assertConfigError(
        self,
        text: str,
        section: str | None,
        key: str | None,
        overrides: Overrides | None = None,
        source: str = SOURCE,
    ) -> ConfigError:
        """
        Parsing C{text} fails with a one-line L{ConfigError} naming C{source}, C{section}
        and C{key}.
        """
        error = self.assertRaises(ConfigError, parseConfig, text, source, overrides or Overrides())
        message = str(error)
        self.assertEqual(message.splitlines(), [message], f"not one line: {message!r}")
        self.assertTrue(message.startswith(source + ":"), message)
        self.assertEqual((error.section, error.key), (section, key), message)
        if section is not None:
            self.assertIn(f"[{section}]", message)
        if key is not None:
            self.assertIn(f" {key}:", message)
        self.assertTrue(error.problem, message)
        return error


class DefaultsTests(SynchronousTestCase):
    def test_everyDefault(self) -> None:
        """
        A file with only a listener gets every declared default, parsed.
        """
        config = parseConfig(iniText(LISTENER), SOURCE)
        self.assertEqual(config.source, SOURCE)
        for section, keys in sectionKeys().items():
            if section == LISTENER_SECTION:
                continue
            values = sectionValues(config, section)
            for key in keys:
                self.assertEqual(
                    getattr(values, key.name), key.parse(key.default), f"[{section}] {key.name}"
                )

    def test_listenerDefaults(self) -> None:
        (listener,) = parseConfig(iniText(LISTENER), SOURCE).listeners
        declared = {k.name: k.parse(k.default) for k in sectionKeys()[LISTENER_SECTION]}
        self.assertEqual(listener.name, "main")
        self.assertEqual(listener.endpoint, "tcp:7000")
        self.assertEqual(listener.framing, declared["framing"])
        self.assertEqual(listener.max_frame, declared["max_frame"])
        framing = listener.makeFraming()
        self.assertEqual(framing.feed(framing.frame(b"{}")), [b"{}"])

    def test_defaultsAreConsistent(self) -> None:
        """
        The default liveness passes the configuration's own cross-checks, and the typed
        values have the types the rest of the gateway expects.
        """
        config = parseConfig(iniText(LISTENER), SOURCE)
        self.assertGreater(config.liveness.idle_timeout, config.liveness.ping_interval)
        self.assertIsInstance(config.liveness.hello_timeout, float)
        self.assertIsInstance(config.liveness.keepalive, bool)
        self.assertIsInstance(config.liveness.keepalive_count, int)
        self.assertIsInstance(config.timestamps.max_age, float)

    def test_valuesOverrideDefaults(self) -> None:
        config = makeConfig(
            liveness={"hello_timeout": "3s", "keepalive": "no", "keepalive_count": "9"},
            timestamps={"max_age": "90s"},
            auth={"mode": "TOKEN"},
            gateway={"instance_id": "gw-1"},
        )
        self.assertEqual(config.liveness.hello_timeout, 3.0)
        self.assertIs(config.liveness.keepalive, False)
        self.assertEqual(config.liveness.keepalive_count, 9)
        self.assertEqual(config.timestamps.max_age, 90.0)
        self.assertEqual(config.auth.mode, "token")
        self.assertEqual(config.instance_id, "gw-1")


class DurationTests(SynchronousTestCase):
    def test_units(self) -> None:
        cases = {
            "500ms": 0.5,
            "15s": 15.0,
            "2m": 120.0,
            "1h": 3600.0,
            "2d": 172800.0,
            "45": 45.0,
            "1.5": 1.5,
            "0.25s": 0.25,
            " 10 s ": 10.0,
            "0": 0.0,
        }
        for raw, seconds in cases.items():
            self.assertAlmostEqual(parseDuration(raw), seconds, msg=raw)

    def test_invalid(self) -> None:
        for raw in ("", "s", "-1s", "1 sec", "1e3", "ten", "1.s", "1,5s", "15 s s", "nan", "inf"):
            self.assertRaises(ValueError, parseDuration, raw)

    def test_inConfig(self) -> None:
        config = makeConfig(
            liveness={
                "hello_timeout": "500ms",
                "ping_interval": "15s",
                "idle_timeout": "2m",
                "close_grace": "2",
            }
        )
        self.assertEqual(config.liveness.hello_timeout, 0.5)
        self.assertEqual(config.liveness.ping_interval, 15.0)
        self.assertEqual(config.liveness.idle_timeout, 120.0)
        self.assertEqual(config.liveness.close_grace, 2.0)


class ErrorTests(ConfigErrorAssertions):
    def test_unknownSection(self) -> None:
        self.assertConfigError(iniText({**LISTENER, "livenes": {"x": "1"}}), "livenes", None)

    def test_defaultSectionIsUnknown(self) -> None:
        """
        C{[DEFAULT]} is not special: its keys would silently apply everywhere.
        """
        self.assertConfigError(iniText({**LISTENER, "DEFAULT": {"x": "1"}}), "DEFAULT", None)

    def test_unknownKey(self) -> None:
        self.assertConfigError(
            iniText({**LISTENER, "liveness": {"ping_intervall": "10s"}}),
            "liveness",
            "ping_intervall",
        )

    def test_keysAreCaseSensitive(self) -> None:
        self.assertConfigError(
            iniText({**LISTENER, "liveness": {"Ping_Interval": "10s"}}), "liveness", "Ping_Interval"
        )

    def test_unknownListenerKey(self) -> None:
        self.assertConfigError(
            iniText({"listener:main": {"endpoint": "tcp:1", "max_frames": "10"}}),
            "listener:main",
            "max_frames",
        )

    def test_wrongType(self) -> None:
        cases = [
            ("liveness", "hello_timeout", "soon"),
            ("liveness", "keepalive", "maybe"),
            ("liveness", "keepalive_count", "five"),
            ("liveness", "keepalive_count", "2.5"),
            ("auth", "mode", "password"),
            ("database", "migrate", "sometimes"),
            ("database", "schema", "Bad-Name"),
            ("gateway", "instance_id", "has space"),
        ]
        for section, key, value in cases:
            self.assertConfigError(iniText({**LISTENER, section: {key: value}}), section, key)

    def test_wrongTypeInListener(self) -> None:
        self.assertConfigError(
            iniText({"listener:main": {"endpoint": "tcp:1", "max_frame": "big"}}),
            "listener:main",
            "max_frame",
        )

    def test_outOfRange(self) -> None:
        cases = [
            ("liveness", "hello_timeout", "0s"),
            ("liveness", "hello_timeout", "2h"),
            ("liveness", "keepalive_count", "0"),
            ("liveness", "keepalive_count", "128"),
            ("liveness", "close_grace", "61s"),
            ("timestamps", "max_age", "0"),
            ("database", "pool_size", "101"),
        ]
        for section, key, value in cases:
            error = self.assertConfigError(
                iniText({**LISTENER, section: {key: value}}), section, key
            )
            self.assertIn(value, str(error))

    def test_maxFrameOutOfRange(self) -> None:
        self.assertConfigError(
            iniText({"listener:main": {"endpoint": "tcp:1", "max_frame": "1023"}}),
            "listener:main",
            "max_frame",
        )

    def test_multiLineValue(self) -> None:
        """
        A continuation line cannot smuggle a newline into the error message.
        """
        text = "[listener:main]\nendpoint = tcp:1\n[liveness]\nhello_timeout = 10x\n  more\n"
        self.assertConfigError(text, "liveness", "hello_timeout")

    def test_idleTimeoutMustExceedPingInterval(self) -> None:
        for idle in ("10s", "9s"):
            self.assertConfigError(
                iniText({**LISTENER, "liveness": {"ping_interval": "10s", "idle_timeout": idle}}),
                "liveness",
                "idle_timeout",
            )
        config = makeConfig(liveness={"ping_interval": "10s", "idle_timeout": "10500ms"})
        self.assertEqual(config.liveness.idle_timeout, 10.5)

    def test_idleTimeoutAgainstDefaultPingInterval(self) -> None:
        """
        The check also applies when only one of the two is set.
        """
        default = makeConfig().liveness.ping_interval
        self.assertConfigError(
            iniText({**LISTENER, "liveness": {"idle_timeout": f"{default:g}s"}}),
            "liveness",
            "idle_timeout",
        )

    def test_unknownFraming(self) -> None:
        error = self.assertConfigError(
            iniText({"listener:main": {"endpoint": "tcp:1", "framing": "msgpack"}}),
            "listener:main",
            "framing",
        )
        self.assertIn("msgpack", str(error))

    def test_listenerWithoutEndpoint(self) -> None:
        self.assertConfigError(
            iniText({"listener:main": {"framing": "lines"}}), "listener:main", "endpoint"
        )

    def test_badListenerName(self) -> None:
        self.assertConfigError(
            iniText({"listener:a b": {"endpoint": "tcp:1"}}), "listener:a b", None
        )
        self.assertConfigError(iniText({"listener:": {"endpoint": "tcp:1"}}), "listener:", None)

    def test_noListener(self) -> None:
        self.assertConfigError(iniText({"liveness": {"hello_timeout": "5s"}}), None, None)

    def test_notIni(self) -> None:
        self.assertConfigError("endpoint = tcp:1\n[listener:main]\n", None, None)

    def test_duplicateKey(self) -> None:
        error = self.assertRaises(
            ConfigError,
            parseConfig,
            "[listener:main]\nendpoint = tcp:1\nendpoint = tcp:2\n",
            SOURCE,
        )
        self.assertEqual(len(str(error).splitlines()), 1)
        self.assertIn(SOURCE, str(error))
        self.assertIn("endpoint", str(error))

    def test_missingFile(self) -> None:
        path = self.mktemp()
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(len(str(error).splitlines()), 1)
        self.assertIn(path, str(error))


class SchemaLengthTests(ConfigErrorAssertions):
    """
    The schema names NOTIFY channels, which must fit PostgreSQL's 63-byte identifiers.
    """

    def channels(self, schema: str) -> list[str]:
        return [takeoverChannel(schema), commandsChannel(schema), resultsChannel(schema)]

    def test_longestAccepted(self) -> None:
        """
        A 54-byte schema is accepted, and every channel named after it fits in 63 bytes.
        """
        schema = "s" * 54
        config = parseConfig(iniText({**LISTENER, "database": {"schema": schema}}), SOURCE)
        self.assertEqual(config.database.schema, schema)
        for channel in self.channels(schema):
            self.assertLessEqual(len(channel.encode("utf-8")), 63, channel)

    def test_tooLongRefused(self) -> None:
        """
        From 55 bytes on (where C{<schema>_takeover} would pass 63 bytes) the schema is
        refused with the usual one-line error naming file, section and key, up to the
        63 characters the identifier pattern itself allows.
        """
        for length in (55, 60, 63):
            schema = "s" * length
            self.assertGreater(len(takeoverChannel(schema).encode("utf-8")), 63)
            error = self.assertConfigError(
                iniText({**LISTENER, "database": {"schema": schema}}), "database", "schema"
            )
            self.assertIn("54", error.problem)
            self.assertIn(f"{schema}_takeover", error.problem)

    def test_tooLongInFileRefused(self) -> None:
        """
        The limit applies however the file is read: L{loadConfig} refuses it too.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(iniText({**LISTENER, "database": {"schema": "x" * 55}}))
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual((error.source, error.section, error.key), (path, "database", "schema"))


class ListenerTests(SynchronousTestCase):
    def test_severalFramings(self) -> None:
        """
        Each listener gets its own framing and maximum frame size.
        """
        config = parseConfig(
            iniText(
                {
                    "listener:text": {"endpoint": "tcp:7000", "framing": "lines"},
                    "listener:bin": {
                        "endpoint": "tcp:7001",
                        "framing": "int32",
                        "max_frame": "2000",
                    },
                    "listener:ns": {"endpoint": "tcp:7002", "framing": "netstring"},
                }
            ),
            SOURCE,
        )
        byName = {listener.name: listener for listener in config.listeners}
        self.assertEqual(set(byName), {"text", "bin", "ns"})
        self.assertEqual(
            {name: (c.endpoint, c.framing) for name, c in byName.items()},
            {
                "text": ("tcp:7000", "lines"),
                "bin": ("tcp:7001", "int32"),
                "ns": ("tcp:7002", "netstring"),
            },
        )
        self.assertEqual(byName["text"].makeFraming().frame(b"{}"), b"{}\n")
        self.assertEqual(byName["bin"].makeFraming().frame(b"{}"), b"\x00\x00\x00\x02{}")
        self.assertEqual(byName["ns"].makeFraming().frame(b"{}"), b"2:{},")
        self.assertEqual(byName["bin"].max_frame, 2000)
        self.assertNotEqual(byName["text"].max_frame, 2000)
        bin = byName["bin"].makeFraming()
        bin.frame(b"x" * 2000)
        self.assertRaises(FramingError, bin.frame, b"x" * 2001)

    def test_framingPerConnection(self) -> None:
        """
        C{makeFraming} makes a fresh parser each time: connections share no buffer.
        """
        (listener,) = makeConfig().listeners
        first, second = listener.makeFraming(), listener.makeFraming()
        self.assertIsNot(first, second)
        self.assertEqual(first.feed(b'{"a"'), [])
        self.assertEqual(second.feed(b"{}\n"), [b"{}"])


class OverridesTests(ConfigErrorAssertions):
    def test_bareListenReplacesOnlyListener(self) -> None:
        text = iniText({"listener:ctl": {"endpoint": "tcp:7000", "framing": "int32"}})
        config = parseConfig(text, SOURCE, Overrides(listen=("tcp:9000",)))
        (listener,) = config.listeners
        self.assertEqual(
            (listener.name, listener.endpoint, listener.framing), ("ctl", "tcp:9000", "int32")
        )

    def test_bareListenWithEquals(self) -> None:
        """
        An endpoint whose options contain C{=} is still a bare endpoint.
        """
        text = iniText({"listener:ctl": {"endpoint": "tcp:7000"}})
        endpoint = "tcp:9000:interface=127.0.0.1"
        config = parseConfig(text, SOURCE, Overrides(listen=(endpoint,)))
        self.assertEqual([(c.name, c.endpoint) for c in config.listeners], [("ctl", endpoint)])

    def test_bareListenWithoutListeners(self) -> None:
        config = parseConfig("", SOURCE, Overrides(listen=("tcp:9000",)))
        (listener,) = config.listeners
        self.assertEqual(listener.endpoint, "tcp:9000")
        self.assertEqual(listener.framing, "lines")

    def test_bareListenAmbiguous(self) -> None:
        text = iniText(
            {"listener:a": {"endpoint": "tcp:7000"}, "listener:b": {"endpoint": "tcp:7001"}}
        )
        error = self.assertRaises(
            ConfigError, parseConfig, text, SOURCE, Overrides(listen=("tcp:9000",))
        )
        self.assertEqual(len(str(error).splitlines()), 1)
        self.assertIn("--listen", str(error))

    def test_namedListen(self) -> None:
        text = iniText(
            {
                "listener:a": {"endpoint": "tcp:7000", "framing": "netstring"},
                "listener:b": {"endpoint": "tcp:7001"},
            }
        )
        config = parseConfig(
            text, SOURCE, Overrides(listen=("a=tcp:9000:interface=::1", "c=tcp:9002"))
        )
        self.assertEqual(
            [(c.name, c.endpoint, c.framing) for c in config.listeners],
            [
                ("a", "tcp:9000:interface=::1", "netstring"),
                ("b", "tcp:7001", "lines"),
                ("c", "tcp:9002", "lines"),
            ],
        )

    def test_instanceAndHttp(self) -> None:
        text = iniText(
            {
                **LISTENER,
                "gateway": {"instance_id": "from-file"},
                "http": {"endpoint": "tcp:8080", "api_token": "t"},
            }
        )
        config = parseConfig(text, SOURCE, Overrides(instance_id="from-cli", http="tcp:9090"))
        self.assertEqual(config.instance_id, "from-cli")
        self.assertEqual(config.http.endpoint, "tcp:9090")
        self.assertEqual(config.http.api_token, "t")
        plain = parseConfig(text, SOURCE)
        self.assertEqual((plain.instance_id, plain.http.endpoint), ("from-file", "tcp:8080"))

    def test_overridesWithoutSections(self) -> None:
        config = parseConfig(
            iniText(LISTENER), SOURCE, Overrides(instance_id="gw-2", http="tcp:1234", dsn="x=1")
        )
        self.assertEqual(
            (config.instance_id, config.http.endpoint, config.database.dsn),
            ("gw-2", "tcp:1234", "x=1"),
        )

    def test_overrideValidated(self) -> None:
        self.assertConfigError(
            iniText(LISTENER), "gateway", "instance_id", Overrides(instance_id="not valid!")
        )


class ExampleFileTests(SynchronousTestCase):
    """
    C{etc/ctrlgw.ini} documents every key with its default.
    """

    def setUp(self) -> None:
        if not os.path.exists(EXAMPLE_INI):
            raise SkipTest(f"{EXAMPLE_INI} does not exist yet")
        with open(EXAMPLE_INI, encoding="utf-8") as f:
            self.text = f.read()

    def documentedValues(self) -> dict[str, dict[str, str]]:
        """
        Every C{key = value} of every section, set or commented out (C{# key = value} or
        C{; key = value}), by section; listener sections are merged under
        C{listener:NAME}.  A key set for real wins over a commented-out one.
        """
        values: dict[str, dict[str, str]] = {}
        section: str | None = None
        header = re.compile(r"^\s*[#;]?\s*\[([^\]]+)\]\s*$")
        active = re.compile(r"^([a-z_][a-z0-9_]*)\s*[=:]\s*(.*?)\s*$")
        commented = re.compile(r"^\s*[#;]\s*([a-z_][a-z0-9_]*)\s*=\s*(.*?)\s*$")
        for line in self.text.splitlines():
            match = header.match(line)
            if match:
                section = match.group(1).strip()
                if section.startswith("listener:"):
                    section = LISTENER_SECTION
                continue
            if section is None:
                continue
            match = active.match(line)
            if match:
                values.setdefault(section, {})[match.group(1)] = match.group(2)
                continue
            match = commented.match(line)
            if match:
                values.setdefault(section, {}).setdefault(match.group(1), match.group(2))
        return values

    def test_loads(self) -> None:
        """
        The shipped file is a valid configuration with at least one listener.
        """
        config = loadConfig(EXAMPLE_INI)
        self.assertEqual(config.source, EXAMPLE_INI)
        self.assertTrue(config.listeners)

    def test_everyKeyWithDefault(self) -> None:
        documented = self.documentedValues()
        missing = []
        wrong = []
        for section, keys in sectionKeys().items():
            for key in keys:
                raw = documented.get(section, {}).get(key.name)
                if raw is None:
                    missing.append(f"[{section}] {key.name}")
                elif section == LISTENER_SECTION and key.name == "endpoint":
                    continue  # required; its declared default is the empty string
                elif key.parse(raw) != key.parse(key.default):
                    wrong.append(f"[{section}] {key.name} = {raw!r}, default {key.default!r}")
        self.assertEqual(missing, [], "keys not documented in etc/ctrlgw.ini")
        self.assertEqual(wrong, [], "documented values that are not the defaults")

    def test_noUndeclaredKeys(self) -> None:
        """
        The file documents no key the parser would refuse.
        """
        declared = {section: {k.name for k in keys} for section, keys in sectionKeys().items()}
        extra = [
            f"[{section}] {key}"
            for section, keys in self.documentedValues().items()
            for key in keys
            if key not in declared.get(section, set())
        ]
        self.assertEqual(extra, [])
