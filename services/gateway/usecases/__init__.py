"""Use cases behind the routes, one module per domain. Each works on the request's session and never
commits: the session dependency commits once, then sends what was buffered (services.gateway.transaction).
Queries live in the repositories (percept.db.*)."""
