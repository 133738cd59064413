"""Views of a run's events: the live dashboard, the staleness report (`sdp inspect-staleness`),
plots and the position audit, all reading one fold of the events (`event_fold.RunFold`). Only
`commands/` and `cli` import them."""
