#!/usr/bin/env python3
"""The seed's RPC server (RabbitMQ tutorial, pika), indentation restored.

Changes from the seed, all for running it in CI: the broker URL comes from AMQP_URL
(default amqp://guest:guest@127.0.0.1:5672/%2F), and Ctrl-C/SIGTERM stop it quietly (its
consuming loop checks for them between events, instead of channel.start_consuming()).
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


# SIGTERM or Ctrl-C only ask the loop below to stop: an exception raised from the handler
# could land inside pika's own I/O, and `timeout` (which CI runs this under) delivers its
# SIGTERM twice, the second during connection.close().
stopping = False


def stop(signum, frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue='rpc_queue', on_message_callback=on_request)
print(" [x] Awaiting RPC requests")
# The seed's channel.start_consuming(), with a way out.
while not stopping:
    connection.process_data_events(time_limit=0.1)
connection.close()
sys.exit(0)
