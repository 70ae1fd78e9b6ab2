"""Development tools, imported by the tests, the demo and the benches alike.

A Dovecot harness, a TCP proxy that counts, cuts, pauses and delays, a hostile IMAP fake, a STOMP
client, private PostgreSQL/RabbitMQ resources and a service-process runner, the corpus, and one
mail generator. ``mailferry.devkit`` is excluded from the wheel: it exists only in a checkout.
"""
