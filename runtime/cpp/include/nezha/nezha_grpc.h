/* A gRPC transport in C++ for `nezha serve --grpc-port` (serve/grpc_native.py) and a gRPC load client for
 * `nezha loadtest --protocol grpc` (serve/loadclients.py): libnezha_grpc.so, built with libgrpc++ when
 * CMake finds it. Neither reads the messages: the server hands each call's method and request bytes to its
 * embedder through a queue and answers with the status and bytes the embedder gives back; the client sends
 * bytes it is given. What a call means (KServe v2, the model) stays with the embedder.
 *
 * The server never calls back into the embedder: calls wait in a queue, and a file descriptor (an eventfd)
 * is readable while the queue is not empty, so that an event loop can watch it and take the calls in its
 * own thread. No function throws; errors are a return value and, where there is one, a message buffer. */
#ifndef NEZHA_GRPC_H
#define NEZHA_GRPC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nezha_grpc_server nezha_grpc_server;

/* Listen on `address` ("127.0.0.1:8001") for every method of every service. Messages over
 * max_message_bytes are refused by gRPC (RESOURCE_EXHAUSTED); a call that arrives while max_calls calls
 * are in flight (counted from their arrival, before their request is read) is answered RESOURCE_EXHAUSTED
 * at once; a call whose request has not arrived read_timeout_seconds after the call did is answered
 * DEADLINE_EXCEEDED, and one that ends without a request message INVALID_ARGUMENT. NULL on failure (the port is
 * taken, the address is malformed), the reason in error[error_size]. */
nezha_grpc_server* nezha_grpc_start(const char* address, int32_t max_message_bytes, int32_t max_calls,
                                    double read_timeout_seconds, char* error, size_t error_size);

/* The descriptor that is readable while calls wait for nezha_grpc_next. */
int nezha_grpc_fd(nezha_grpc_server* server);

/* Take the next waiting call: 1 and its id, method ("/package.Service/Method"), request bytes (both
 * valid until the next nezha_grpc_next call) and the seconds left before the client's deadline (-1: none);
 * 0 when none waits (the descriptor is then no longer readable until one arrives). One thread calls it. */
int nezha_grpc_next(nezha_grpc_server* server, uint64_t* id, const char** method, size_t* method_size,
                    const uint8_t** request, size_t* request_size, double* seconds_left);

/* Answer call `id`: status code 0 (OK) with the response bytes, else the code and message (the bytes are
 * then ignored). 0 when answered; 1 when there is no such call waiting for an answer (already answered,
 * or answered UNAVAILABLE by nezha_grpc_stop). */
int nezha_grpc_finish(nezha_grpc_server* server, uint64_t id, int code, const char* message,
                      const uint8_t* response, size_t response_size);

/* Stop: new calls are answered UNAVAILABLE, the calls in flight get up to grace_seconds to be finished
 * (nezha_grpc_finish from another thread), then the rest are answered UNAVAILABLE and the port is closed.
 * Call it once, from a thread other than the one that finishes calls; then nezha_grpc_free. */
void nezha_grpc_stop(nezha_grpc_server* server, double grace_seconds);
void nezha_grpc_free(nezha_grpc_server* server);

/* The load client: `concurrency` clients on one channel to `address` call `method` for duration_seconds,
 * each sending bodies[(offset + i * 7919 + j) % count] as its j-th request (distinct slices of the
 * bodies per client) and its next one when the answer is in (10 ms later after an UNAVAILABLE, so that a
 * server that went away is not hammered); a call's deadline is timeout_seconds. Writes the latency in
 * seconds of OK answers (*latencies_count: how many were OK in all; when more than latencies_capacity, a
 * uniform sample of them), the number of calls that ended with each status code (status_counts[17], by
 * code) and the seconds the run took. 0 on success; 1 when the channel could not be made (error says why). */
int nezha_grpc_load(const char* address, const char* method, const uint8_t* const* bodies, const size_t* sizes,
                    size_t count, int concurrency, double duration_seconds, size_t offset, double timeout_seconds,
                    double* latencies, size_t latencies_capacity, size_t* latencies_count, int64_t* status_counts,
                    double* seconds, char* error, size_t error_size);

#ifdef __cplusplus
}
#endif

#endif
