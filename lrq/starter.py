"""The commented starter config ``lrq init`` writes."""

STARTER = '''\
# lrq configuration. Relative paths are relative to this file's folder.
# Environment overrides: LRQ_CONFIG (this file), LRQ_DATA_DIR, LRQ_DB_URL.

data_dir = "data"                          # left/ right/ tmp/ failed/ per queue, logs
db_url   = "sqlite:///data/results.db"     # results + batch ledger (postgresql://, mysql://)
# interval = 0.25                          # seconds between scheduler ticks
# grace    = 30                            # seconds a stopping worker gets to finish
# secret   = "..."                         # batch-signing key (else LRQ_SECRET, else data/secret.key)
# previous_secrets = ["..."]              # old keys that still verify batches (env LRQ_PREVIOUS_SECRETS=a,b)
# http_token = "..."                       # web page POSTs (else LRQ_HTTP_TOKEN, else data/http.token)

[queues.docs]
handler    = "workers.wordcount:handle"    # callable(items: list[dict]) -> list[dict]
batch_size = 100                           # items per left/ file
chunk_size = 10                            # items per handler call
workers    = 2                             # concurrent worker processes
key        = "doc_id"                      # item field that identifies it; unique per item
result_table = "doc_results"               # generic table (queue, key, value JSON) ...
# model = "workers.models:DocEntMap"       # ... or your own ORM model with a unique key column
# order = "random"                         # or "fifo"
# max_pending = 50                         # sniffer pauses while this many batches (or "500MB") wait
# compress = "zstd"                        # batch files: "zstd", "zlib" or "none"
# run_seconds = 300                        # a scheduled worker process exits after this long
# retries = 2                              # extra tries: a lone bad item's (at once), a transient failure's
# backoff = 0.5                            # seconds before a transient retry, doubled each time (max 60)
# handler_timeout = 300                    # a handler call running longer is interrupted (a timeout)
# lease = 60                               # a claim without heartbeat this long is reclaimed
# max_attempts = 3                         # a batch that failed this often -> failed/
#                                          # (one whose worker died twice is split instead)
# pipeline = true                          # store a batch while the handler runs the next one
# batch_max_bytes = "1MB"                  # batch rules (README): close a batch before this size,
# separate = "workers.storage:apart"       # ... start a new batch where this function says True,
# batch_linger = "2s"                      # ... let a batch that is not full wait this long for more
# Several outputs instead of one handler (README, "Several outputs per queue"): drop handler,
# result_table and model above and give each output its own table:
# [queues.docs.outputs.words]
# handler = "workers.wordcount:handle"
# result_table = "doc_words"

[queues.docs.source]
kind     = "sql"                 # or logfile, ingest, redis-stream, redis-list, kafka, http-agent
url      = "sqlite:///data/source.db"
table    = "source_data"
order_by = "id"                            # keyset paging column: must only grow
columns  = { id = "id", doc_id = "mid", content = "content" }   # item field = column

[cleanup]
# every   = "15s"                          # how often the scheduler runs the reaper
# tmp_age = "1h"                           # orphan tmp/ files older than this are removed
keep_done = "7d"                           # done batches are removed after this long
# keep_failed = "30d"                      # failed and quarantined batches after this long
max_bytes = "10GB"                         # budget for the queue folders and logs
min_free  = "10%"                          # free space (bytes and inodes) to keep, or "5GB"
'''
