#!/usr/bin/env python3
"""The seed's RPC client (RabbitMQ tutorial, pika), indentation restored.

Changes from the seed, all for running it in CI: the broker URL comes from AMQP_URL
(default amqp://guest:guest@127.0.0.1:5672/%2F); n comes from argv (default 30); it stops
after its answer instead of consuming forever, and exits 1 when no answer comes within
RPC_TIMEOUT seconds (default 30) or when the server answers with an error (an x-rpc-error
header, as warren-rpc's server sends). The wire behaviour is the seed's: an exclusive
server-named reply queue, a uuid4 correlation_id, the request published to 'rpc_queue' on
the default exchange with reply_to and correlation_id.
"""
import os
import sys
import time
import uuid

import pika

url = os.environ.get("AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F"
n = sys.argv[1] if len(sys.argv) > 1 else "30"
timeout = float(os.environ.get("RPC_TIMEOUT", "30"))

# Connect to the broker
connection = pika.BlockingConnection(pika.URLParameters(url))
# Open a channel
channel = connection.channel()
# Declare an exclusive, server-named reply queue
result = channel.queue_declare(queue='', exclusive=True)
callback_queue = result.method.queue

response = None
error = None


# Called with each reply
def on_response(ch, method, props, body):
    global response, error
    if corr_id == props.correlation_id:
        headers = props.headers or {}
        if 'x-rpc-error' in headers:
            message = headers['x-rpc-error']
            error = message.decode() if isinstance(message, bytes) else str(message)
        else:
            response = int(body)
            print(" [.] Got %r" % response)


# A unique correlation_id
corr_id = str(uuid.uuid4())
# Send the request to 'rpc_queue'
channel.basic_publish(exchange='',
                      routing_key='rpc_queue',
                      properties=pika.BasicProperties(
                          reply_to=callback_queue,
                          correlation_id=corr_id,
                      ),
                      body=n)
# Wait for the reply
channel.basic_consume(queue=callback_queue, on_message_callback=on_response, auto_ack=True)
print(" [x] Sent %r" % n)
deadline = time.monotonic() + timeout
while response is None and error is None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        print("rpc_client.py: no reply within %ss" % timeout, file=sys.stderr)
        connection.close()
        sys.exit(1)
    connection.process_data_events(time_limit=min(remaining, 1.0))
connection.close()
if error is not None:
    print("rpc_client.py: remote error: %s" % error, file=sys.stderr)
    sys.exit(1)
