import Foundation
import Herald

/// Gets device JWTs from the sample backend (`sample-backend/token-server.py`,
/// `POST /device-token {"user": ..., "device_id": ...}`), the way a real app asks its own
/// backend. The token is bound to the device id the SDK passes (the configured one, or
/// the one it generated), which the gateway requires as the token's `did`. The app holds
/// no API key. The SDK calls `fetchToken` on a background thread, so it may block.
final class SampleBackendTokenProvider: TokenProvider {
    private let backendUrl: String
    private let user: String

    init(backendUrl: String, user: String) {
        self.backendUrl = backendUrl
        self.user = user
    }

    func fetchToken(deviceId: String) throws -> String {
        let endpoint = backendUrl.hasSuffix("/") ? backendUrl + "device-token" : backendUrl + "/device-token"
        guard let url = URL(string: endpoint) else {
            throw HeraldError.TokenProvider(detail: "bad sample backend URL '\(backendUrl)'")
        }
        var request = URLRequest(url: url, timeoutInterval: 10)
        request.httpMethod = "POST"
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
        request.httpBody = try JSONSerialization.data(withJSONObject: ["user": user, "device_id": deviceId])

        let done = DispatchSemaphore(value: 0)
        var answer: (Data?, URLResponse?, Error?) = (nil, nil, nil)
        URLSession.shared.dataTask(with: request) { data, response, error in
            answer = (data, response, error)
            done.signal()
        }.resume()
        done.wait()

        if let error = answer.2 {
            throw HeraldError.TokenProvider(
                detail: "sample backend \(endpoint) unreachable (\(error.localizedDescription)); is token-server.py running?")
        }
        let status = (answer.1 as? HTTPURLResponse)?.statusCode ?? 0
        let body = answer.0 ?? Data()
        guard status == 200,
              let object = try? JSONSerialization.jsonObject(with: body) as? [String: Any],
              let token = object["token"] as? String
        else {
            let text = String(data: body, encoding: .utf8) ?? ""
            throw HeraldError.TokenProvider(detail: "sample backend \(endpoint) answered \(status): \(text)")
        }
        return token
    }
}
