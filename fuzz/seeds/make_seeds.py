#!/usr/bin/env python3
"""Writes seed inputs for both fuzz targets into corpus/<target>/ (valid and slightly broken
frame sequences for channel 1, which the connection target opens before the input)."""
import os, struct

def frame(t, ch, payload, end=0xCE):
    return struct.pack('>BHI', t, ch, len(payload)) + payload + bytes([end])

def sstr(s):
    s = s.encode() if isinstance(s, str) else s
    return bytes([len(s)]) + s

def lstr(s):
    s = s.encode() if isinstance(s, str) else s
    return struct.pack('>I', len(s)) + s

def method(ch, cls, mid, args=b''):
    return frame(1, ch, struct.pack('>HH', cls, mid) + args)

def declare(name, args=b'', flags=0):
    return method(1, 50, 10, b'\x00\x00' + sstr(name) + bytes([flags]) + lstr(args))

def publish(rk, body, props=b'\x00\x00', ch=1):
    out = method(ch, 60, 40, b'\x00\x00' + sstr('') + sstr(rk) + b'\x00')
    out += frame(2, ch, struct.pack('>HHQ', 60, 0, len(body)) + props)
    if body:
        out += frame(3, ch, body)
    return out

table = sstr('x-message-ttl') + b'I' + struct.pack('>i', 1000) + sstr('x-s') + b'S' + lstr('v') \
    + sstr('x-t') + b'F' + lstr(sstr('a') + b't\x01') + sstr('x-a') + b'A' + lstr(b'b\x01')
props = struct.pack('>H', 0xFFFC) + sstr('text/plain') + sstr('gzip') + lstr(sstr('h') + b'S' + lstr('v')) \
    + b'\x02\x05' + sstr('corr') + sstr('reply') + sstr('60000') + sstr('id') \
    + struct.pack('>Q', 1) + sstr('type') + sstr('guest') + sstr('app') + sstr('')

seeds = {
    'declare_publish_get': declare('q', flags=4) + publish('q', b'hello') + method(1, 60, 70, b'\x00\x00' + sstr('q') + b'\x00'),
    'declare_args': declare('', table, flags=4),
    'publish_props': declare('q', flags=4) + publish('q', b'x' * 10, props),
    'consume_ack': declare('q', flags=4) + publish('q', b'a') + method(1, 60, 20, b'\x00\x00' + sstr('q') + sstr('c') + b'\x00' + lstr(b'')) + method(1, 60, 80, struct.pack('>Q', 1) + b'\x00'),
    'confirm_tx': method(1, 85, 10, b'\x00') + publish('nowhere', b'abc') + method(1, 90, 10) + publish('q', b'') + method(1, 90, 20),
    'qos_nack': method(1, 60, 10, struct.pack('>IH', 0, 5) + b'\x00') + method(1, 60, 120, struct.pack('>Q', 0) + b'\x03'),
    'channel_cycle': method(2, 20, 10, sstr('')) + method(2, 20, 40, struct.pack('>H', 200) + sstr('') + struct.pack('>HH', 0, 0)) + method(2, 20, 41),
    'exchange_bind': method(1, 40, 10, b'\x00\x00' + sstr('x') + sstr('topic') + b'\x08' + lstr(b'')) + declare('q', flags=4) + method(1, 50, 20, b'\x00\x00' + sstr('q') + sstr('x') + sstr('a.#') + b'\x00' + lstr(b'')) + publish('a.b', b'm'),
    'multi_body': declare('q', flags=4) + method(1, 60, 40, b'\x00\x00' + sstr('') + sstr('q') + b'\x00') + frame(2, 1, struct.pack('>HHQ', 60, 0, 6) + b'\x00\x00') + frame(3, 1, b'abc') + frame(3, 1, b'def'),
    'bad_end': method(1, 60, 10, struct.pack('>IH', 0, 5) + b'\x00')[:-1] + b'\x00',
    'bad_type': frame(9, 1, b''),
    'heartbeat': frame(8, 0, b''),
    'oversize': b'\x03\x00\x01\x00\xa0\x00\x00',
    'close': method(0, 10, 50, struct.pack('>H', 200) + sstr('bye') + struct.pack('>HH', 0, 0)) + method(0, 10, 51),
    'direct_reply': method(1, 60, 20, b'\x00\x00' + sstr('amq.rabbitmq.reply-to') + sstr('') + b'\x02' + lstr(b'')) + publish('q', b'r', struct.pack('>H', 0x0200) + sstr('amq.rabbitmq.reply-to')),
}
def start_ok(user='guest', password='guest', mechanism='PLAIN', caps=True):
    props = sstr('capabilities') + b'F' + lstr(sstr('authentication_failure_close') + b't\x01') if caps else b''
    if mechanism == 'AMQPLAIN':
        response = sstr('LOGIN') + b'S' + lstr(user) + sstr('PASSWORD') + b'S' + lstr(password)
    else:
        response = b'\x00' + user.encode() + b'\x00' + password.encode()
    return method(0, 10, 11, lstr(props) + sstr(mechanism) + lstr(response) + sstr('en_US'))

def tune_ok(channel_max=2047, frame_max=131072, heartbeat=0):
    return method(0, 10, 31, struct.pack('>HIH', channel_max, frame_max, heartbeat))

def open_vhost(vhost='/'):
    return method(0, 10, 40, sstr(vhost) + sstr('') + b'\x00')

HEADER = b'AMQP\x00\x00\x09\x01'
handshake_seeds = {
    'valid': HEADER + start_ok() + tune_ok() + open_vhost(),
    'valid_then_publish': HEADER + start_ok() + tune_ok() + open_vhost() + method(1, 20, 10, sstr('')) + seeds['declare_publish_get'],
    'amqplain': HEADER + start_ok(mechanism='AMQPLAIN') + tune_ok(4096, 4096, 30) + open_vhost(),
    'wrong_password': HEADER + start_ok(password='nope'),
    'wrong_password_silent': HEADER + start_ok(password='nope', caps=False),
    'unknown_mechanism': HEADER + start_ok(mechanism='FOO'),
    'frame_max_too_small': HEADER + start_ok() + tune_ok(frame_max=100),
    'wrong_vhost': HEADER + start_ok() + tune_ok() + open_vhost('nope'),
    'old_header': b'AMQP\x01\x01\x00\x09' + start_ok() + tune_ok() + open_vhost(),
    'wrong_header': b'AMQP\x00\x00\x08\x00',
    'http': b'GET / HTTP/1.1\r\n\r\n',
    'method_before_open': HEADER + start_ok() + tune_ok() + method(1, 20, 10, sstr('')),
}
here = os.path.dirname(os.path.abspath(__file__))
for target, prefix in (('connection', b''), ('decode_frames', b'\x02')):
    d = os.path.join(here, '..', 'corpus', target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, 'seed_' + name), 'wb') as f:
            f.write(prefix + data)
d = os.path.join(here, '..', 'corpus', 'handshake')
os.makedirs(d, exist_ok=True)
for name, data in handshake_seeds.items():
    with open(os.path.join(d, 'seed_' + name), 'wb') as f:
        f.write(data)
print('wrote', len(seeds), 'seeds for decode_frames and connection,', len(handshake_seeds), 'for handshake')
