/* A reference for the benchmark, not a product: bare_forwarder.py in C.

       cc -O2 -o bare_forwarder bench/bare_forwarder.c
       ./bare_forwarder PORT COMMAND [ARG...]

   It listens on 127.0.0.1:PORT, starts COMMAND with a channel as
   socketprotector would ($SOCKETPROTECTOR_FD), and per connection makes
   the four system calls forwarding needs: epoll_wait, accept4, sendmsg of
   the descriptor, close.  Nothing else: no restarts, no queue kept for a
   dying child.  bench.py compiles it into a temporary directory when a C
   compiler is there; its row is the floor of the hop in compiled code. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PORT COMMAND [ARG...]\n", argv[0]);
        return 2;
    }
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), on = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 1024))
        die("listen");
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, pair)) die("socketpair");
    if (fork() == 0) {
        char fd[16];
        snprintf(fd, sizeof fd, "%d", pair[1]);
        setenv("SOCKETPROTECTOR_FD", fd, 1);
        setenv("SOCKETPROTECTOR_HANDOFF", "forward", 1);
        execvp(argv[2], argv + 2);
        die("exec");
    }
    close(pair[1]);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    char header[2] = {'C', AF_INET};
    for (;;) {
        if (epoll_wait(ep, &ev, 1, -1) < 1) continue;
        int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) continue;
        union { struct cmsghdr align; char buf[CMSG_SPACE(sizeof(int))]; } control;
        struct iovec iov = {.iov_base = header, .iov_len = sizeof header};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = control.buf, .msg_controllen = sizeof control.buf};
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
        sendmsg(pair[0], &msg, MSG_NOSIGNAL);
        close(fd);
    }
}
