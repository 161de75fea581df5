"""Peer systems for ``bench/compare.py``: one module per framework, each run from its own venv.

Every module exposes the same small surface, used by the harness:

* ``worker_cmd(python, url)``: the command line that starts one consumer process;
* ``Publisher(url)``: an async context manager with ``publish(task_ids)`` (a backlog) and
  ``publish_one(task_id)``;
* ``done_keys(task_ids)`` (one result key per task) or ``RESULTS_STREAM`` (one results stream):
  how the harness sees a task finish; ``NOTIFY``: the keyspace-event pattern of that write.

Each consumer does the same work per task: parse the ~530-byte JSON payload, build the echo
result JSON (``common.echo_result``) and store it, with a status, the way that framework
stores results.
"""
