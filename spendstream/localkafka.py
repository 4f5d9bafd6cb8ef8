"""A real Apache Kafka broker on the loopback interface, for development, demos and tests.

Runs the official broker jars that ``deploy/kafka/pom.xml`` resolves from Maven Central into
``deploy/kafka/lib`` as one KRaft process (broker and controller combined)::

    java -cp 'deploy/kafka/lib/*' kafka.Kafka <data_dir>/server.properties

Everything the broker owns lives in ``data_dir``: the rendered ``server.properties``, the
partition logs (``data_dir/logs``), the broker's own log ``kafka.log`` and ``kafka.pid``.
No Docker, no Kafka distribution tarball; needs Java 17+ and, once, Maven.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spendstream.errors import LocalKafkaError

if TYPE_CHECKING:
    from spendstream.settings import Settings

KAFKA_DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kafka"
"""deploy/kafka: the pom, the broker config template and the log4j2 config."""
DEFAULT_JARS_DIR = KAFKA_DEPLOY_DIR / "lib"


def require_checkout() -> None:
    """Refuse clearly when ``deploy/kafka`` is not beside the package (an installed wheel).

    The local broker is a development tool of a spendstream checkout: it needs the pom that
    resolves the broker jars and the broker's config templates, which are not installed.
    """
    missing = [
        name
        for name in ("pom.xml", "server.properties.template", "log4j2.properties")
        if not (KAFKA_DEPLOY_DIR / name).is_file()
    ]
    if missing:
        raise LocalKafkaError(
            f"the local Kafka broker runs from a spendstream checkout: {KAFKA_DEPLOY_DIR} lacks "
            f"{', '.join(missing)}. Clone the repository and run ./dev setup, or point "
            "SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS at a Kafka cluster instead."
        )


MIN_JAVA = 17
HOST = "127.0.0.1"
LOG_TAIL_LINES = 20
_MAIN_CLASS = "kafka.Kafka"


@dataclass(frozen=True)
class LocalKafkaStatus:
    """What :meth:`LocalKafka.status` found."""

    running: bool
    """Our broker process (from the pid file) is alive."""
    answering: bool
    """It answers a metadata request."""
    pid: int | None
    bootstrap: str
    data_dir: Path
    log_path: Path


class LocalKafka:
    """One KRaft broker+controller process on ``127.0.0.1:port`` with its data in ``data_dir``.

    ``up()`` and ``down()`` are idempotent and may be called from different processes: the
    pid file in ``data_dir`` is the source of truth, and ``down()`` only ever signals a
    process whose command line shows it is this broker (``kafka.Kafka`` with our config file).
    """

    def __init__(
        self,
        port: int = 19092,
        controller_port: int | None = None,
        data_dir: Path | str = Path(".spendstream") / "kafka",
        kafka_version: str = "4.1.1",
        heap: str = "512m",
        jars_dir: Path | str = DEFAULT_JARS_DIR,
        *,
        start_timeout_s: float = 90.0,
        partitions: int = 6,
    ) -> None:
        self.port = port
        self.controller_port = controller_port if controller_port is not None else port + 1
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.kafka_version = kafka_version
        self.heap = heap
        self.jars_dir = Path(jars_dir).expanduser().resolve()
        self.start_timeout_s = start_timeout_s
        self.partitions = partitions
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalKafka:
        """The broker ``settings.kafka.local`` describes, with its data in ``kafka_data_dir``."""
        local = settings.kafka.local
        return cls(
            port=local.port,
            controller_port=local.controller_port,
            data_dir=settings.kafka_data_dir,
            kafka_version=local.kafka_version,
            heap=local.heap,
            start_timeout_s=local.start_timeout_s,
            partitions=settings.topics.partitions,
        )

    # -- paths -----------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients."""
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's own log (standard output and error of the JVM)."""
        return self.data_dir / "kafka.log"

    @property
    def pid_path(self) -> Path:
        """The pid file written by :meth:`up`."""
        return self.data_dir / "kafka.pid"

    @property
    def config_path(self) -> Path:
        """The rendered broker configuration."""
        return self.data_dir / "server.properties"

    @property
    def log_dirs(self) -> Path:
        """Partition logs and the KRaft metadata log."""
        return self.data_dir / "logs"

    # -- public operations -----------------------------------------------------------------

    def up(self) -> None:
        """Start the broker unless it already runs, and wait until it answers metadata requests.

        Raises :class:`LocalKafkaError` when Java or Maven is missing, a port is taken by another
        process, or the broker does not come up within ``start_timeout_s``.
        """
        require_checkout()
        java = self._java()
        deadline = time.monotonic() + self.start_timeout_s
        pid = self._our_pid()
        if pid is not None:
            self._wait_answering(pid, deadline)
            return
        self.ensure_jars()
        self._check_ports_free()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._format_storage(java)
        self._start(java)
        assert self._proc is not None
        self._wait_answering(self._proc.pid, deadline)

    def down(self, timeout: float = 30.0) -> bool:
        """Stop our broker (SIGTERM, then SIGKILL after ``timeout`` s); False if none ran."""
        pid = self._our_pid()
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 10.0):
                raise LocalKafkaError(
                    f"the local Kafka broker (pid {pid}) did not exit even after SIGKILL."
                )
        self.pid_path.unlink(missing_ok=True)
        self._proc = None
        return True

    def status(self) -> LocalKafkaStatus:
        """Whether our broker process is alive and whether it answers."""
        pid = self._our_pid()
        answering = False
        if pid is not None:
            from spendstream.kafka_admin import broker_answers

            answering = broker_answers({"bootstrap.servers": self.bootstrap}, timeout=3.0)
        return LocalKafkaStatus(
            running=pid is not None,
            answering=answering,
            pid=pid,
            bootstrap=self.bootstrap,
            data_dir=self.data_dir,
            log_path=self.log_path,
        )

    def ensure_jars(self) -> None:
        """Resolve the broker jars with Maven into ``jars_dir`` unless they are already there."""
        if self._jars_present():
            return
        require_checkout()
        others = sorted(
            p.name for p in self.jars_dir.glob("kafka_2.13-*.jar") if p.name != self._main_jar
        )
        if others:
            raise LocalKafkaError(
                f"{self.jars_dir} holds {', '.join(others)}, not Kafka {self.kafka_version}; "
                "delete that folder so the requested version can be resolved into it."
            )
        mvn = shutil.which("mvn")
        if mvn is None:
            raise LocalKafkaError(
                f"the Kafka {self.kafka_version} broker jars are not in {self.jars_dir} and "
                "Maven (`mvn`) is not on PATH to resolve them; install Maven 3 and run again."
            )
        self.jars_dir.mkdir(parents=True, exist_ok=True)
        pom = KAFKA_DEPLOY_DIR / "pom.xml"
        # Several test sessions may start at once on a fresh clone; one resolves, others wait.
        with (self.jars_dir / ".resolve.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._jars_present():
                return
            cmd = [mvn, "-q", "-B", "-f", str(pom)]
            cmd += [f"-Dkafka.version={self.kafka_version}", "dependency:copy-dependencies"]
            if self.jars_dir != DEFAULT_JARS_DIR:
                cmd.append(f"-DoutputDirectory={self.jars_dir}")
            print(f"resolving Apache Kafka {self.kafka_version} jars with Maven", file=sys.stderr)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not self._jars_present():
                raise LocalKafkaError(
                    f"Maven could not resolve Kafka {self.kafka_version} into {self.jars_dir} "
                    f"(exit {done.returncode}):\n{_tail(done.stdout + done.stderr)}"
                )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the broker log ('' if there is none)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                text = fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return _tail(text, lines)

    # -- internals -------------------------------------------------------------------------

    @property
    def _main_jar(self) -> str:
        return f"kafka_2.13-{self.kafka_version}.jar"

    def _jars_present(self) -> bool:
        return (self.jars_dir / self._main_jar).is_file() and any(
            self.jars_dir.glob("log4j-slf4j-impl-*.jar")
        )

    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else None
        if java is None or not os.access(java, os.X_OK):
            java = shutil.which("java")
        if java is None:
            raise LocalKafkaError(
                f"Java {MIN_JAVA}+ is needed to run the local Kafka broker but `java` is not on "
                f"PATH (nor in JAVA_HOME); install a JDK {MIN_JAVA} or newer."
            )
        out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
        match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
        if match:
            major = int(match.group(1))
            if major == 1 and match.group(2):  # "1.8.0_392" style
                major = int(match.group(2))
            if major < MIN_JAVA:
                raise LocalKafkaError(
                    f"Kafka {self.kafka_version} needs Java {MIN_JAVA}+ but {java} is Java "
                    f"{major}; put a newer JDK first on PATH or set JAVA_HOME."
                )
        return java

    def _our_pid(self) -> int | None:
        """The pid in our pid file if that process is alive and is this broker, else None."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None  # reaped: it exited
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False  # alive, but another user's process: certainly not ours
        cmdline = _cmdline(pid)
        return _MAIN_CLASS in cmdline and str(self.config_path) in cmdline

    def _check_ports_free(self) -> None:
        for port, what in ((self.port, "client"), (self.controller_port, "controller")):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                # Like the JVM: ignore TIME_WAIT remnants of our previous run, so a restart
                # on the same port is not mistaken for a foreign listener.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((HOST, port))
                except OSError:
                    raise LocalKafkaError(
                        f"cannot start the local Kafka broker: {what} port {HOST}:{port} is "
                        "already in use by another process; stop it or choose another port "
                        "(SPENDSTREAM_KAFKA__LOCAL__PORT)."
                    ) from None

    def _write_config(self) -> None:
        template = string.Template((KAFKA_DEPLOY_DIR / "server.properties.template").read_text())
        text = template.substitute(
            host=HOST,
            port=self.port,
            controller_port=self.controller_port,
            log_dirs=self.log_dirs,
            partitions=self.partitions,
            internal_partitions=min(self.partitions, 6),
            heap=self.heap,
        )
        self.config_path.write_text(text, encoding="utf-8")

    def _classpath(self) -> str:
        return str(self.jars_dir / "*")

    def _format_storage(self, java: str) -> None:
        if (self.log_dirs / "meta.properties").is_file():
            return  # formatted before: a restart on the same data keeps its cluster id
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        cmd = [java, *self._jvm_log_opts(), "-cp", self._classpath(), "kafka.tools.StorageTool"]
        # "=" form: a generated id may start with "-", which argparse would take for an option.
        cmd += ["format", f"--cluster-id={cluster_id}", "--config", str(self.config_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LocalKafkaError(
                f"formatting the Kafka storage in {self.log_dirs} failed "
                f"(exit {done.returncode}):\n{_tail(done.stdout + done.stderr)}"
            )

    def _jvm_log_opts(self) -> list[str]:
        log4j = KAFKA_DEPLOY_DIR / "log4j2.properties"
        return [f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={self.data_dir}"]

    def _start(self, java: str) -> None:
        cmd = [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            # The flags of Kafka's own kafka-run-class.sh.
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            *self._jvm_log_opts(),
            "-cp",
            self._classpath(),
            _MAIN_CLASS,
            str(self.config_path),
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n==> spendstream: starting {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session: the broker outlives `spendstream kafka up` and ignores its Ctrl-C.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self._proc.pid}\n")

    def _wait_answering(self, pid: int, deadline: float) -> None:
        from spendstream.kafka_admin import broker_answers

        conf = {"bootstrap.servers": self.bootstrap}
        while True:
            # Right after fork the child's cmdline is still python's: trust our own Popen
            # handle while the child lives, and the cmdline check only without one.
            alive = self._proc.poll() is None if self._proc is not None else self._is_ours(pid)
            if not alive:
                code = self._proc.poll() if self._proc is not None else None
                self.pid_path.unlink(missing_ok=True)
                self._proc = None
                raise LocalKafkaError(
                    f"the local Kafka broker exited during start-up (exit code {code}); "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if _port_open(self.port) and broker_answers(conf, timeout=2.0):
                return
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.down(timeout=10.0)
                raise LocalKafkaError(
                    f"the local Kafka broker did not answer on {self.bootstrap} within "
                    f"{self.start_timeout_s:g} s and was stopped; last lines of "
                    f"{self.log_path}:\n{tail}"
                )
            time.sleep(0.25)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout=timeout)  # reaps our child: no zombie left behind
                return True
            except subprocess.TimeoutExpired:
                return False
        while time.monotonic() < deadline:
            if not self._is_ours(pid):
                return True
            time.sleep(0.1)
        return not self._is_ours(pid)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        if sys.platform.startswith("linux"):
            return ""
    except OSError:
        return ""
    done = subprocess.run(  # macOS and other systems without /proc
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return done.stdout


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
