#!/usr/bin/env python3
"""The seed's RPC server (RabbitMQ tutorial, pika), indentation restored.

Changes from the seed, all for running it in CI: the broker URL comes from AMQP_URL
(default amqp://guest:guest@127.0.0.1:5672/%2F), and Ctrl-C/SIGTERM stop it quietly.
The wire behaviour is the seed's: queue 'rpc_queue', prefetch 1, reply to props.reply_to
with the correlation_id copied, then ack.
"""
import os
import signal
import sys

import pika

url = os.environ.get("AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F"
# Connect to the broker
connection = pika.BlockingConnection(pika.URLParameters(url))
# Open a channel
channel = connection.channel()
# Declare the queue 'rpc_queue'
channel.queue_declare(queue='rpc_queue')


# The function the clients call (the seed's recursive fib)
def fib(n):
    if n == 0:
        return 0
    elif n == 1:
        return 1
    else:
        return fib(n - 1) + fib(n - 2)


# Called for each request
def on_request(ch, method, props, body):
    n = int(body)
    print(" [.] fib(%s)" % n)
    response = fib(n)
    # Send the reply back to the client
    ch.basic_publish(exchange='',
                     routing_key=props.reply_to,
                     properties=pika.BasicProperties(correlation_id=props.correlation_id),
                     body=str(response))
    ch.basic_ack(delivery_tag=method.delivery_tag)


def stop(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, stop)
channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue='rpc_queue', on_message_callback=on_request)
print(" [x] Awaiting RPC requests")
try:
    channel.start_consuming()
except KeyboardInterrupt:
    connection.close()
    sys.exit(0)
