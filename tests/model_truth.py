"""Dense curvature of a model's loss on the whole data set at once, by ``torch.func.jacrev``."""

import torch
from torch.func import functional_call, jacrev


class Truth:
    """Dense curvature of ``loss_fn(model(x), y)`` on the whole data set."""

    def __init__(self, model, loss_fn, x, y):
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().flatten() for p in model.parameters()])
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y

    def params(self, theta):
        parts = theta.split([s.numel() for s in self.shapes])
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def output(self, theta, x):
        return functional_call(self.model, self.params(theta), (x,))

    def hessian(self):
        loss = lambda t: self.loss_fn(self.output(t, self.x), self.y)  # noqa: E731
        return jacrev(jacrev(loss))(self.theta)

    def jacobian(self, x=None):
        x = self.x if x is None else x
        return jacrev(lambda t: self.output(t, x).flatten())(self.theta)

    def ggn(self):
        out = self.output(self.theta, self.x).detach()
        loss = lambda o: self.loss_fn(o.reshape(out.shape), self.y)  # noqa: E731
        lam = jacrev(jacrev(loss))(out.flatten())
        j = self.jacobian()
        return j.T @ lam @ j

    def normalizer(self):
        if self.loss_fn.reduction == "sum":
            return 1.0
        return self.y.numel()  # every element (MSE, BCE) or every class-index target (CE)

    def per_datum_gradients(self, targets):
        summed = type(self.loss_fn)(reduction="sum")
        rows = [
            jacrev(lambda t, n=n: summed(self.output(t, self.x[n : n + 1]), targets[n : n + 1]))(self.theta)
            for n in range(len(self.x))
        ]
        return torch.stack(rows)

    def empirical_fisher(self):
        g = self.per_datum_gradients(self.y)
        return g.T @ g / self.normalizer()
