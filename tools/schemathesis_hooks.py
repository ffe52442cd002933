"""A schemathesis check of our own, loaded with SCHEMATHESIS_HOOKS=tools.schemathesis_hooks.

tools/schemathesis.toml lets POST /v1/classify answer a schema-valid request with 422, since no
schema can say "a readable image". This check keeps that exception from hiding a schema looser
than the code: a query the schema admits must never be refused for its form.
"""

import json

import schemathesis
from schemathesis.core.parameters import ParameterLocation

FORM_REFUSALS = ("query parameter", "region must be")  # edgebc/serve/app.py, serve/runtime.py


@schemathesis.check
def schema_valid_queries_are_not_refused_for_their_form(ctx, response, case):  # type: ignore[no-untyped-def]
    """A 422 that blames the query's form, for a query generated to match the schema, means the
    schema admits what the code refuses."""
    if response.status_code != 422 or not case.query:
        return
    if case.meta is None or case.meta.is_negative_at(ParameterLocation.QUERY):
        return  # generated to violate the schema: refusing it is right
    try:
        detail = str(json.loads(response.content).get("detail", ""))
    except (ValueError, AttributeError):
        return  # response_schema_conformance reports a body that is not a Problem
    if any(words in detail for words in FORM_REFUSALS):
        raise AssertionError(
            f"the schema admits the query {case.query!r} but the server refused its form: {detail}"
        )
