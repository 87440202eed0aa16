"""A job as clients write and read it: the request they send (schemas), the job object they
read back (presenter) and the refusals they may meet (errors).

Below every domain package that takes jobs in or shows them (jobs, batches, templates,
webhooks, budgets, keys, quotas), so that each can speak of a job without importing the
job lifecycle in promptq.jobs.
"""
