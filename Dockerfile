# The SIGMAX Gateway: WORKERS processes under supervisord on one port (python -m app supervise).
#   docker compose up          # with Redis and PostgreSQL: compose.yaml
FROM python:3.11-slim

WORKDIR /srv/sigmax
COPY requirements.txt ./
COPY client ./client
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
# The gateway runs as a user of its own, not root: the code is root's and read-only to it; it
# writes only its runtime directory and (with SQLite) its state directory.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sigmax \
 && mkdir -p /run/sigmax /var/lib/sigmax && chown sigmax:sigmax /run/sigmax /var/lib/sigmax
USER sigmax

# Listen on every interface of the container; the keys decide who gets in. Without any key
# (API_KEYS, or one stored with `python -m app keys create`) the gateway refuses to start here,
# unless ALLOW_OPEN_GATEWAY=true says it may serve everyone.
ENV HOST=0.0.0.0 PORT=8000 WORKERS=2 SIGMAX_RUN_DIR=/run/sigmax \
    DATABASE_URL=sqlite:////var/lib/sigmax/sigmax.db
EXPOSE 8000
# The database to the latest migration, then the supervised workers (exec: supervisord gets
# the container's SIGTERM and stops every worker gracefully).
CMD ["sh", "-c", "python -m app migrate && exec python -m app supervise"]
