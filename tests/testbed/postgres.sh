# shellcheck shell=bash
# The testbed's PostgreSQL: the distribution's server (installed with apt-get when
# missing), a fresh cluster per `up` in a directory of its own, password (SCRAM) auth,
# listening on 127.0.0.1 only. Sourced by `testbed`.

PG_PACKAGES=(postgresql)

pg_bin() { # the server's bin directory, newest major first
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -rn); do
    [ -x "$d/postgres" ] && [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

pg_packages() {
  pg_bin >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "the testbed's PostgreSQL needs the Debian package ${PG_PACKAGES[*]} (install it, or run as root)"
  log "installing ${PG_PACKAGES[*]} (Debian packages)"
  mkdir -p "$CACHE"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PG_PACKAGES[@]}"; } >"$CACHE/apt-postgres.log" 2>&1 ||
    { tail -20 "$CACHE/apt-postgres.log" >&2; die "apt-get install failed (log: $CACHE/apt-postgres.log)"; }
  pg_bin >/dev/null || die "no PostgreSQL server after installing ${PG_PACKAGES[*]}"
}

# The cluster's directory: outside $STATE, because the server refuses to run as root and
# its user cannot enter a root-owned home. One per state directory.
pg_dir() { echo "/tmp/sdfleet-testbed-postgres-$(printf '%s' "$STATE" | md5sum | cut -c1-12)"; }

pg_user() { # who runs the server: this user, or `postgres` (the package's) under root
  if [ "$(id -u)" = 0 ]; then echo postgres; else id -un; fi
}

pg_up() { # port
  local port=$1 bin dir user password
  bin=$(pg_bin) || die "no PostgreSQL server (run: $0 build)"
  dir=$(pg_dir)
  user=$(pg_user)
  rm -rf "$dir"
  mkdir -p "$dir" "$STATE/logs"
  password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
  echo "$password" >"$dir/pwfile"
  [ "$(id -u)" = 0 ] && chown -R "$user:" "$dir"
  chmod 700 "$dir"
  as_pg_user "$bin/initdb" -D "$dir/data" -U sdfleet --pwfile="$dir/pwfile" --auth=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >"$STATE/logs/postgres-initdb.log" 2>&1 ||
    { tail -20 "$STATE/logs/postgres-initdb.log" >&2; die "initdb failed"; }
  echo "$password" >"$STATE/postgres.password"
  RUN_AS=$([ "$(id -u)" = 0 ] && echo "$user" || true) start postgres "$bin/postgres" -D "$dir/data" \
    -h 127.0.0.1 -p "$port" -k "$dir" -c max_connections=200 -c shared_buffers=64MB
}

as_pg_user() {
  if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups "$@"; else "$@"; fi
}

pg_healthy() {
  "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$POSTGRES_PORT"
}

pg_create_db() { # once healthy: the tests' database
  PGPASSWORD=$(cat "$STATE/postgres.password") "$(pg_bin)/psql" -q -h 127.0.0.1 -p "$POSTGRES_PORT" \
    -U sdfleet -d postgres -c 'CREATE DATABASE sdfleet' >/dev/null
}

pg_url() {
  echo "postgres://sdfleet:$(cat "$STATE/postgres.password")@127.0.0.1:$POSTGRES_PORT/sdfleet?sslmode=disable"
}

pg_clean() { rm -rf "$(pg_dir)"; }
