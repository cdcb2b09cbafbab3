"""Stage 4, answering queries: the Parquet schemas, `answer_queries` (pure, no Ray), the Ray
Data engine that runs it on an actor pool and commits its output atomically (commit), bulk
query sets from a spec (make_queries, spec), the output lease, and the Python API for
notebooks (`cvae.CausalModel`)."""
